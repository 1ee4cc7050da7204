"""Golden parity: bpo-ray's scorers against outputs of the official reference implementations.

The goldens in tests/fixtures/parity/ were produced by running the public reference code on inputs
written for this project (tests/fixtures/parity/README.md says how); these tests assert that
bpo-ray computes exactly what the reference computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bpo_ray.eval.chair import chair_report, score_caption
from bpo_ray.eval.rohrbach import RohrbachExtractor, pattern_singularize
from bpo_ray.evaluate.benchmarks.chair import coco_truth

PARITY = Path(__file__).parent / "fixtures" / "parity"


def _json(name: str) -> Any:
    return json.loads((PARITY / name).read_text())


@pytest.fixture(scope="module")
def rohrbach() -> RohrbachExtractor:
    return RohrbachExtractor((PARITY / "chair" / "synonyms.txt").read_text().splitlines(), mode="rohrbach")


def test_singularizer_matches_pattern_on_every_coco_form_and_its_plurals() -> None:
    golden: dict[str, str] = _json("pattern_singularize_golden.json")
    assert len(golden) > 3000
    ours = {word: pattern_singularize(word) for word in golden}
    assert ours == golden
    assert golden["bus"] == "bu" and golden["policemen"] == "policeman"  # the defect and the rule kept


def test_chair_matches_rohrbach_reference_caption_by_caption(rohrbach: RohrbachExtractor) -> None:
    golden = _json("chair_rohrbach_golden.json")
    generated = {row["image_id"]: row["caption"] for row in _json("chair/generated_captions.json")}
    _, truth = coco_truth(_json("chair/instances_val2014.json"), _json("chair/captions_val2014.json"), rohrbach)
    items = []
    for expected in golden["sentences"]:
        image_id = expected["image_id"]
        found = rohrbach.caption_words(generated[image_id])
        assert found.tokens == expected["words"], expected["caption"]
        assert found.objects == expected["mscoco_generated_words"], expected["caption"]
        assert sorted(truth[image_id]) == expected["mscoco_gt_words"], expected["caption"]
        item = score_caption(generated[image_id], truth[image_id], rohrbach)
        hallucinated = [[word, obj] for word, obj, pos in zip(found.words, found.objects, found.positions)
                        if obj not in truth[image_id]]
        assert hallucinated == expected["mscoco_hallucinated_words"], expected["caption"]
        assert [pos for (_, obj), pos in zip(zip(found.words, found.objects), found.positions)
                if obj not in truth[image_id]] == expected["hallucination_idxs"]
        assert (int(item.is_hallucinated), item.chair_i) == (expected["CHAIRs"], expected["CHAIRi"])
        items.append(item)
    report = chair_report(items)
    assert (report.chair_s, report.chair_i) == (golden["overall"]["CHAIRs"], golden["overall"]["CHAIRi"])
