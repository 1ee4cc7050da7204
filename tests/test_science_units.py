"""The science benchmark's pure parts: caption grammar (fluency) and the multi-seed table."""

from __future__ import annotations

import random

import pytest

from bpo_ray.evaluate.multiseed import CHAIR_I, FLUENCY, RECALL, aggregate, check_targets
from bpo_ray.world import grammar, scenes


def test_every_ground_truth_caption_is_well_formed():
    rng = random.Random(0)
    captions = [scenes.describe_scene(scenes.sample_scene(rng)) for _ in range(300)]
    assert grammar.well_formed_share(captions) == 1.0


@pytest.mark.parametrize("caption", [
    "There is a purple the center. There is a purple the center. There is a blue mouse on the right.",
    "There is a red cup on the left. There is a red cup on the left.",       # a sentence repeated
    "There are two blue dogs, at the top and on the right and at the bottom.",  # count disagrees
    "There is a red cup on the left",                                        # unfinished
    "",
    "The cup yes.",
])
def test_degenerate_captions_are_not_well_formed(caption):
    assert not grammar.is_well_formed(caption)


def test_two_sentences_for_one_kind_are_fluent():
    assert grammar.is_well_formed("There is a yellow pen at the top right. There is a yellow pen on the right.")


def test_parse_caption_reads_kinds_colours_and_cells():
    parsed = grammar.parse_caption("There is an orange cup at the top left. There are three green dogs, "
                                   "on the left, in the center and at the bottom right.")
    assert parsed == [("cup", "orange", ("top left",)), ("dog", "green", ("left", "center", "bottom right"))]


def _headline(base: float, bpo: float, sft: float, ablation: float) -> dict:
    row = lambda chair_i, recall=50.0, fluent=99.0: {CHAIR_I: chair_i, RECALL: recall, FLUENCY: fluent}
    return {"base": row(base), "bpo": row(bpo), "sft": row(sft), "bpo_no_weakening": row(ablation)}


def test_aggregate_mean_sd_and_targets_on_every_seed():
    table = aggregate({0: _headline(7.0, 3.0, 6.0, 5.0), 1: _headline(5.0, 2.0, 4.0, 4.0), 2: _headline(6.0, 4.0, 5.0, 6.0)})
    stat = table.cells["bpo"][CHAIR_I]
    assert stat.values == [3.0, 2.0, 4.0] and stat.mean == 3.0 and stat.sd == pytest.approx(1.0)
    assert "3.0 ± 1.0" in table.markdown()
    assert all(t.met for t in check_targets(table))


def test_paired_deltas_are_per_seed_changes_against_base():
    from bpo_ray.evaluate.multiseed import paired_deltas

    table = aggregate({0: _headline(7.0, 3.0, 6.0, 5.0), 1: _headline(5.0, 2.0, 4.0, 4.0), 2: _headline(6.0, 4.0, 5.0, 6.0)})
    row = next(line for line in paired_deltas(table).splitlines() if line.startswith("| bpo |"))
    assert "-3.0 ± 1.0 (-4.0, -3.0, -2.0)" in row


def test_targets_fail_when_one_seed_goes_the_wrong_way():
    table = aggregate({0: _headline(7.0, 2.0, 6.0, 5.0), 1: _headline(5.0, 1.0, 4.0, 4.0), 2: _headline(2.0, 2.5, 5.0, 6.0)})
    verdicts = {t.claim: t.met for t in check_targets(table)}
    assert verdicts["bpo lowers CHAIR_i below base on every seed"] is False
    assert verdicts["bpo lowers mean CHAIR_i by >= 40% relative"] is True
