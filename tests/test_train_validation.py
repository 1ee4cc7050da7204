"""Train-time validation, fast tier: the held-out split, how workers share the held-out pairs, the
metrics, the collapse warning and the best-adapter bookkeeping (the Ray Train runs that use them
are in test_train_ray.py)."""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from bpo_ray.config.train import ValidationConfig
from bpo_ray.train.data import held_out_rows, prepare_pairs
from bpo_ray.train.validation import BEST_FILE, VALIDATION_DIR, BestAdapter, batches, chosen_drop, summarise
from train_pairs import build_pairs_rows, write_pairs


def test_held_out_split_is_stable_and_follows_the_ids_not_the_row_order():
    ids = [f"pair-{i}" for i in range(50)]
    rows = list(range(50))
    held = held_out_rows(ids, rows, 10, seed=0)
    assert len(held) == 10 and held == sorted(held)
    assert held_out_rows(ids, rows, 10, seed=0) == held  # same on every call (run, resume)
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    assert {shuffled[i] for i in held_out_rows(shuffled, rows, 10, seed=0)} == {ids[i] for i in held}
    assert held_out_rows(ids, rows, 10, seed=1) != held  # the seed salts the hash
    assert set(held_out_rows(ids, rows, 11, seed=0)) > set(held)  # one more pair, the same ten and one
    assert set(held_out_rows(ids, rows[:25], 5, seed=0)) <= set(rows[:25])  # only among the given rows


@pytest.fixture(scope="module")
def pairs_two_orders(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("val_pairs")
    rows = build_pairs_rows(str(root / "world"), n_scenes=12, limit=12)
    return write_pairs(rows, str(root / "a")), write_pairs(rows[::-1], str(root / "b"))


def test_prepare_pairs_holds_out_the_same_pairs_disjoint_from_training(tiny_models, pairs_two_orders):
    from transformers import AutoProcessor

    from bpo_ray.train.data import read_pairs

    processor = AutoProcessor.from_pretrained(tiny_models["mllm"])
    off = prepare_pairs(pairs_two_orders[0], processor, 256)
    assert off.held_out == [] and off.keep == list(range(12))
    # disabled validation (the default) leaves the training rows exactly as before
    assert prepare_pairs(pairs_two_orders[0], processor, 256, validation=ValidationConfig()) == off
    held = {}
    for uri in pairs_two_orders:
        p = prepare_pairs(uri, processor, 256, validation=ValidationConfig(fraction=0.25))
        ids = read_pairs(uri).column("id").to_pylist()
        assert len(p.held_out) == 3 and len(p.keep) == 9 and not set(p.keep) & set(p.held_out)
        assert p.held_out_ids == [ids[i] for i in p.held_out]
        held[uri] = set(p.held_out_ids)
    assert held[pairs_two_orders[0]] == held[pairs_two_orders[1]]  # by id, whatever the file order
    assert len(prepare_pairs(pairs_two_orders[0], processor, 256, validation=ValidationConfig(n_pairs=5)).held_out) == 5


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_every_worker_runs_the_same_number_of_batches_and_each_pair_is_scored_once(world, micro):
    for n in range(1, 20):
        shares = [batches(n, world, rank, micro) for rank in range(world)]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) >= 1  # ZeRO-3: same collectives
        scored = sorted(i for s in shares for b in s for i in b)
        assert scored == list(range(n))
        assert all(len(b) <= micro for s in shares for b in s)


def test_summarise_gives_means_per_pair_and_the_log_prob_deltas():
    # two pairs: chosen -10, -14 (reference -9, -9), rejected -20, -30 (reference -15, -15)
    sums = {"n": 2, "loss": 1.2, "reward_accuracy": 1.0, "reward_margin": 0.6, "chosen_reward": -0.6,
            "rejected_reward": -1.2, "chosen_logp": -24.0, "ref_chosen_logp": -18.0, "rejected_logp": -50.0,
            "ref_rejected_logp": -30.0}
    val = summarise(sums)
    assert val["val_loss"] == pytest.approx(0.6) and val["val_reward_accuracy"] == pytest.approx(0.5)
    assert val["val_chosen_logp_delta"] == pytest.approx(-3.0)  # -12 - -9
    assert val["val_rejected_logp_delta"] == pytest.approx(-10.0)  # -25 - -15
    assert val["val_pairs"] == 2


def test_collapse_warning_fires_past_the_margin_and_not_before():
    cfg = ValidationConfig(fraction=0.1, chosen_drop_warn=2.0)
    assert chosen_drop(cfg, {"val_chosen_logp_delta": -1.99, "val_pairs": 9}, 30) == (False, False, None)
    assert chosen_drop(cfg, {"val_chosen_logp_delta": +5.0, "val_pairs": 9}, 30) == (False, False, None)
    warn, stop, line = chosen_drop(cfg, {"val_chosen_logp_delta": -3.2, "val_pairs": 9}, 40)
    assert (warn, stop) == (True, False)
    assert line == ("WARNING collapse: chosen log-prob fell 3.20 nats below the reference (margin 2) at step 40 "
                    "(mean over 9 held-out pairs)")
    stopping = ValidationConfig(fraction=0.1, chosen_drop_warn=2.0, chosen_drop_stop=3.0)
    assert chosen_drop(stopping, {"val_chosen_logp_delta": -2.5, "val_pairs": 9}, 40)[:2] == (True, False)
    warn, stop, line = chosen_drop(stopping, {"val_chosen_logp_delta": -3.5, "val_pairs": 9}, 40)
    assert (warn, stop) and line.endswith("; stopping: past train.validation.chosen_drop_stop=3")
    silent = ValidationConfig(fraction=0.1, chosen_drop_warn=None)
    assert chosen_drop(silent, {"val_chosen_logp_delta": -100.0, "val_pairs": 9}, 40) == (False, False, None)


def _adapter(tmp_path, tag: str) -> str:
    d = tmp_path / f"local-{tag}"
    d.mkdir()
    (d / "adapter_model.safetensors").write_text(tag)
    (d / "adapter_config.json").write_text("{}")
    return str(d)


def test_best_adapter_keeps_only_the_best_and_survives_a_restart(tmp_path):
    out = str(tmp_path / "out")
    cfg = ValidationConfig(fraction=0.1, metric="loss")  # loss: lower is better
    best = BestAdapter(cfg, out)
    assert best.improves(0.7) and not best.improves(math.nan)
    best.save(_adapter(tmp_path, "s2"), 2, 0.6)
    assert best.improves(0.5) and not best.improves(0.6) and not best.improves(0.65)
    best.save(_adapter(tmp_path, "s4"), 4, 0.5)
    root = os.path.join(out, VALIDATION_DIR)
    assert sorted(os.listdir(root)) == ["best-step-000004", BEST_FILE]  # the step-2 copy is gone
    assert json.load(open(os.path.join(root, BEST_FILE)))["step"] == 4
    assert open(os.path.join(best.adapter_uri(best.record), "adapter_model.safetensors")).read() == "s4"
    # a restarted worker group picks the record up; another metric or direction starts afresh
    assert BestAdapter(cfg, out).load().step == 4
    assert BestAdapter(ValidationConfig(fraction=0.1, metric="loss", mode="max"), out).load() is None
    assert BestAdapter(ValidationConfig(fraction=0.1), out).load() is None
    maxed = BestAdapter(ValidationConfig(fraction=0.1, metric="reward_accuracy"), str(tmp_path / "other"))
    maxed.save(_adapter(tmp_path, "a"), 2, 0.5)
    assert maxed.improves(0.6) and not maxed.improves(0.4)
