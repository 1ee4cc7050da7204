"""Seed 002's training modes on the existing trainer: annotations from a real generate run (world
annotator over HTTP) -> ``bpo-ray derive`` sets (DPO, rejection sampling, SteerLM, judge-answer
SFT) -> Ray Train for a few steps each. Tiny random-init models: plumbing, not quality.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.generate.derive import derive
from bpo_ray.schemas import ANNOTATION_SCHEMA, PAIR_SCHEMA, QUARANTINE_SCHEMA, read_manifest, read_parquet
from bpo_ray.train.plots import read_metrics
from test_annotations_pipeline import N_ITEMS, SAMPLES, _cfg
from test_generate_pipeline import world  # noqa: F401  (fixture)
from tests.serve_support import AppServer as Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def annotated(ray_cluster, tiny_models, world, tmp_path_factory):  # noqa: F811
    from bpo_ray.generate.pipeline import run_generate
    from bpo_ray.world.judge_server import SceneIndex, create_app

    out = str(tmp_path_factory.mktemp("p002") / "generate")
    with Server(create_app(SceneIndex(world))) as url:
        run_generate(_cfg(tiny_models, f"{url}/v1", **{"generate.judge_ranked.min_score_gap": 1}),
                     os.path.join(world, "train.jsonl"), out)
        yield {"out": out, "judge": f"{url}/v1", "root": os.path.dirname(out)}


def test_derived_sets_account_for_every_item(annotated):
    root, src = annotated["root"], annotated["out"]
    table = read_parquet(storage.join(src, "annotations"), ANNOTATION_SCHEMA)
    rs = derive("rejection_sampling", src, f"{root}/rs")
    steer = derive("steerlm", src, f"{root}/steer")
    dpo = derive("dpo", src, f"{root}/dpo", min_gap=1.0)
    for m in (rs, steer, dpo):
        assert m.counts.items_in == N_ITEMS and m.counts.annotations_written == N_ITEMS * SAMPLES
    assert rs.counts.pairs_written == N_ITEMS  # one top completion per item
    nonempty = sum(1 for c in table.column("completion").to_pylist() if c.strip())
    assert steer.counts.pairs_written == nonempty
    gen = read_manifest(storage.join(src, "manifest.json")).counts
    assert dpo.counts.pairs_written == gen.pairs_written  # the same rule, the same pairs
    steer_rows = read_parquet(f"{root}/steer/pairs", PAIR_SCHEMA).to_pylist()
    assert all("\nAttributes: helpfulness:" in r["prompt"] and r["prompt"].endswith(" ASSISTANT:") for r in steer_rows)

    # judge-answer SFT: the world annotator answers each question from the scene, in the world's
    # style, so its answers are the dataset's ground-truth answers; an item whose image is gone is
    # quarantined and counted
    broken = table.slice(0, 1).to_pylist()[0] | {"source_id": "broken#0", "image": f"{root}/missing.png"}
    with_broken = pa.concat_tables([table, pa.Table.from_pylist([broken], schema=ANNOTATION_SCHEMA)])
    os.makedirs(f"{root}/ann_broken/annotations")
    import pyarrow.parquet as pq

    pq.write_table(with_broken, f"{root}/ann_broken/annotations/a.parquet")
    ja = derive("judge_answer", f"{root}/ann_broken", f"{root}/ja", judge_url=annotated["judge"], judge_max_retries=0)
    assert ja.counts.items_in == N_ITEMS + 1 and ja.counts.paired == N_ITEMS and ja.counts.quarantined == 1
    assert ja.counts.by_reason == {"quarantine.missing_image": 1}
    assert read_parquet(f"{root}/ja/quarantine", QUARANTINE_SCHEMA).column("source_id").to_pylist() == ["broken#0"]
    rows = read_parquet(f"{root}/ja/pairs", PAIR_SCHEMA).to_pylist()
    refs = {r["source_id"]: r["reference"] for r in table.to_pylist()}
    assert {r["source_id"]: r["chosen"] for r in rows} == refs


@pytest.mark.parametrize("method,mode", [("rejection_sampling", "sft"), ("steerlm", "sft"), ("judge_answer", "sft"),
                                         ("dpo", "dpo")])
def test_each_mode_trains_on_the_existing_trainer(annotated, tiny_models, method, mode):
    from bpo_ray.train.trainer import run_training

    root, src = annotated["root"], annotated["out"]
    data = f"{root}/train-{method}"
    kw = {"judge_url": annotated["judge"]} if method == "judge_answer" else {}
    m = derive(method, src, data, min_gap=1.0, **kw)
    if m.counts.pairs_written == 0:
        pytest.skip(f"{method}: the tiny model's samples gave no rows to train on")
    cfg = load_config("tiny", [f"models.mllm={tiny_models['mllm']}", f"train.mode={mode}", "train.num_workers=1",
                               "train.per_device_batch_size=2", "train.max_steps=2", "train.lr=5e-3",
                               "train.warmup_ratio=0", "train.max_length=256", "train.validation.fraction=0"])
    out = f"{root}/run-{method}"
    run_training(cfg, data, out)
    records = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert records and all(r["mode"] == mode for r in records)
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
    start = json.loads(storage.read_text(os.path.join(out, "metrics.jsonl")).splitlines()[0])
    assert start.get("event") == "start"
