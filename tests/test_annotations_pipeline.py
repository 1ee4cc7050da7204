"""Seed 002's annotation job end to end: the generate stage with ``judge_ranked`` on a real local
Ray cluster, rated by the world's annotator over HTTP (FastAPI + uvicorn on loopback, the
``openai`` client in the actors); then a judge that answers garbage first (asked again, counted),
a judge that is down (items quarantined, counted) and a resumed run (same bytes).

Models are the tiny random-init ones: the answers are gibberish, so the world annotator rates
them low; the tests check the dataset's plumbing and accounting, not its quality.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.config.generate import FilterConfig
from bpo_ray.generate import annotations as ann
from bpo_ray.generate.shards import ShardStore, shard_name
from bpo_ray.schemas import ANNOTATION_SCHEMA, HELPSTEER_ATTRIBUTES, PAIR_SCHEMA, read_manifest, read_parquet
from test_generate_pipeline import check_accounting, overrides, world  # noqa: F401  (fixture)
from test_generate_units import JudgeServer
from tests.serve_support import AppServer as Server

pytestmark = pytest.mark.slow
N_ITEMS, SAMPLES, SHARD = 8, 4, 4


def _cfg(tiny_models, judge_url: str, **extra):
    return load_config("tiny", overrides(tiny_models, **{
        "generate.strategies": "[judge_ranked]", "generate.max_items": N_ITEMS, "generate.shard_size": SHARD,
        "generate.judge_ranked.judge_url": judge_url, "generate.judge_ranked.num_samples": SAMPLES,
        "generate.judge_ranked.sampling.max_new_tokens": 16,
        "generate.judge_ranked.pool": "{min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 4}", **extra}))


def test_annotation_job_with_the_world_annotator_and_resume(ray_cluster, tiny_models, world, tmp_path):
    from bpo_ray.generate.pipeline import run_generate
    from bpo_ray.world.judge_server import SceneIndex, create_app

    source = os.path.join(world, "train.jsonl")
    out = str(tmp_path / "out")
    with Server(create_app(SceneIndex(world))) as url:
        cfg = _cfg(tiny_models, f"{url}/v1", **{"generate.judge_ranked.min_score_gap": 1})
        manifest = run_generate(cfg, source, out)
        c = manifest.counts
        assert c.items_in == N_ITEMS and c.quarantined == 0, c.by_reason
        assert c.annotations_written == SAMPLES * N_ITEMS
        check_accounting(out, N_ITEMS)
        table = read_parquet(storage.join(out, "annotations"), ANNOTATION_SCHEMA)
        assert table.num_rows == c.annotations_written and len(set(table.column("id").to_pylist())) == table.num_rows
        for row in table.to_pylist():
            assert all(0 <= row[a] <= 4 for a in HELPSTEER_ATTRIBUTES) and row["reasoning"].startswith("The answer")
            assert row["judge_model"] == cfg.generate.judge_ranked.judge_model and row["completion_index"] < SAMPLES
        # pairs are the paper's rule applied to the stored annotations, nothing else
        pairs = read_parquet(storage.join(out, "pairs"), PAIR_SCHEMA) if c.pairs_written else None
        derived = ann.dpo_pairs(table, 1.0, cfg.generate.seed, filters=FilterConfig(**cfg.generate.filters.model_dump()))
        assert derived.num_rows == c.pairs_written
        if pairs is not None:
            assert sorted(derived.to_pylist(), key=lambda r: r["id"]) == sorted(pairs.to_pylist(), key=lambda r: r["id"])

        # resume: shard 1 lost (as if the job died before committing it) -> redone, same bytes
        store = ShardStore(out)
        lost = storage.join(out, "annotations", f"{shard_name(1)}.parquet")
        before = Path(lost).read_bytes()
        kept = Path(storage.join(out, "annotations", f"{shard_name(0)}.parquet")).read_bytes()
        storage.delete(store.marker_uri(1))
        storage.delete(lost)
        again = run_generate(cfg, source, out)
    assert again.timings["shards_resumed"] == 1 and again.counts == c
    assert Path(lost).read_bytes() == before
    assert Path(storage.join(out, "annotations", f"{shard_name(0)}.parquet")).read_bytes() == kept


def test_bad_judge_replies_are_asked_again_and_an_outage_is_quarantined(ray_cluster, tiny_models, world, tmp_path):
    from bpo_ray.generate.pipeline import run_generate

    source = os.path.join(world, "train.jsonl")
    flaky = JudgeServer(mode="flaky")  # garbage the first time each prompt is seen
    try:
        m = run_generate(_cfg(tiny_models, flaky.url), source, str(tmp_path / "flaky"))
    finally:
        flaky.close()
    assert m.counts.quarantined == 0 and m.counts.by_reason["judge.retry"] == N_ITEMS
    assert m.counts.annotations_written == SAMPLES * N_ITEMS and flaky.calls == 2 * N_ITEMS

    never = JudgeServer(mode="garbage")
    try:
        m = run_generate(_cfg(tiny_models, never.url), source, str(tmp_path / "garbage"))
    finally:
        never.close()
    assert m.counts.quarantined == N_ITEMS and m.counts.by_reason == {"quarantine.judge_unparsable": N_ITEMS}
    assert never.calls == 2 * N_ITEMS and m.counts.annotations_written == 0

    down = JudgeServer(mode="error")  # HTTP 500 on every call: the openai client retries, then gives up
    try:
        out = str(tmp_path / "down")
        m = run_generate(_cfg(tiny_models, down.url, **{"generate.judge_ranked.max_retries": 1}), source, out)
    finally:
        down.close()
    assert m.counts.quarantined == N_ITEMS and m.counts.by_reason == {"quarantine.judge_error": N_ITEMS}
    assert down.calls == 2 * N_ITEMS and m.counts.annotations_written == 0
    assert read_manifest(storage.join(out, "manifest.json")).counts == m.counts
    assert not os.path.exists(storage.join(out, "annotations"))
