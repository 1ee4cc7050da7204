"""Generate stage, end to end on a real local Ray cluster over bias-world data.

Both negative strategies (plus judge-ranked) on both backends, to a local dir and to the loopback
S3 server; the pairs load with ``datasets``; bad input, a killed job and a killed actor are
checked with exact counts. Models are the tiny random-init ones, so texts are gibberish: the
tests check plumbing, accounting and backend agreement, not answer quality.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.generate.seeds import noise_seed
from bpo_ray.generate.shards import ShardStore
from bpo_ray.generate.sources import read_source
from bpo_ray.schemas import PAIR_SCHEMA, QUARANTINE_SCHEMA, read_manifest, read_parquet
from conftest import wait_for
from test_generate_units import JudgeServer, write_bad_source

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RESULTS: dict[str, dict] = {}  # pairs of the transformers run, compared with the vLLM run


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    from bpo_ray.world.build import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(str(out), n_scenes=40)
    return str(out)


def overrides(tiny_models, **extra) -> list[str]:
    base = {
        "models.mllm": tiny_models["mllm"], "models.text_llm": tiny_models["text_llm"], "models.device": "cpu",
        "generate.progress": False, "generate.shard_size": 8, "generate.io_num_cpus": 0.1,
        "generate.sampler.sampling.max_new_tokens": 12, "generate.injector.sampling.max_new_tokens": 12,
        "generate.judge_ranked.sampling.max_new_tokens": 12,
        "generate.sampler.pool": "{min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 8}",
        "generate.injector.pool": "{min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 8}",
        "generate.judge_ranked.pool": "{min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 8}",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def world_records(world: str, n: int) -> list[dict]:
    lines = Path(world, "train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def load_pairs(out: str):
    import datasets

    files = sorted(glob.glob(os.path.join(out, "pairs", "*.parquet")))
    return datasets.load_dataset("parquet", data_files=files, split="train")


def check_accounting(out: str, all_items: int) -> None:
    """Markers cover every item exactly once; pair ids are unique; manifest sums the markers."""
    markers = ShardStore(out).markers()
    orders = [o for m in markers for k in ("paired", "filtered", "quarantined") for o in m["orders"][k]]
    assert sorted(orders) == list(range(all_items))
    manifest = read_manifest(storage.join(out, "manifest.json"))
    pairs = read_parquet(storage.join(out, "pairs"), PAIR_SCHEMA)
    assert pairs.num_rows == manifest.counts.pairs_written == sum(m["pairs_written"] for m in markers)
    assert len(set(pairs.column("id").to_pylist())) == pairs.num_rows


def test_local_transformers_all_strategies_and_bad_input(ray_cluster, tiny_models, world, tmp_path):
    from bpo_ray.generate.pipeline import run_generate

    judge = JudgeServer()  # the key header is checked in test_generate_units (workers read it from their node)
    good = world_records(world, 10)
    source, expected_quarantine, total = write_bad_source(tmp_path / "src", good, world)
    out = str(tmp_path / "out")
    cfg = load_config("tiny", overrides(
        tiny_models, **{"generate.strategies": "[image_weakened, error_injection, judge_ranked]",
                        "generate.max_image_bytes": 100000, "generate.judge_ranked.judge_url": judge.url,
                        "generate.judge_ranked.num_samples": 3, "generate.judge_ranked.min_score_gap": 1}))
    try:
        manifest = run_generate(cfg, str(source), out)
    finally:
        judge.close()
    c = manifest.counts
    assert c.items_in == total
    assert c.quarantined == sum(expected_quarantine.values())
    got = {k.split(".", 1)[1]: v for k, v in c.by_reason.items() if k.startswith("quarantine.")}
    assert got == dict(expected_quarantine)
    assert c.paired + c.filtered == total - c.quarantined and c.paired > 0
    assert set(c.by_strategy) == {"image_weakened", "error_injection", "judge_ranked"}, c.by_reason
    assert judge.calls > 0
    check_accounting(out, total)

    quarantine = read_parquet(storage.join(out, "quarantine"), QUARANTINE_SCHEMA)
    assert Counter(quarantine.column("reason").to_pylist()) == expected_quarantine
    assert {"read", "image"} == set(quarantine.column("stage").to_pylist())

    ds = load_pairs(out)
    assert ds.num_rows == c.pairs_written and set(PAIR_SCHEMA.names) <= set(ds.column_names)
    answers = {it["item_id"]: it["answer"] for it in read_source(str(source)).items if it["status"] == "ok"}
    for row in ds:
        assert os.path.isabs(row["image"]) and os.path.exists(row["image"])
        assert row["image_sha256"] == hashlib.sha256(Path(row["image"]).read_bytes()).hexdigest()
        assert row["prompt"].startswith("USER: <image>\n") and row["prompt"].endswith("ASSISTANT:")
        assert row["rejected"].strip() and row["rejected"] != row["chosen"]
        if row["strategy"] == "image_weakened":
            assert row["noise_step"] == 500 and row["seed"] == noise_seed(0, row["source_id"], 500)
            assert row["chosen"] == answers[row["source_id"]]
        elif row["strategy"] == "error_injection":
            assert row["noise_step"] is None and row["chosen"] == answers[row["source_id"]]
            assert json.loads(row["sampling"])["temperature"] == 0.8
        else:  # judge-ranked: chosen is the judge's top answer, rejected at least the gap below
            scores = json.loads(row["sampling"])
            assert judge.scored[row["chosen"]] == scores["chosen_score"] == max(scores["scores"])
            assert judge.scored[row["rejected"]] == scores["rejected_score"] <= scores["chosen_score"] - 1
    RESULTS["transformers"] = {(r["source_id"], r["noise_step"]): r["rejected"] for r in ds
                               if r["strategy"] == "image_weakened"}
    RESULTS["transformers_items"] = {f"{r['id']}#{k}" for r in good for k in range(len(r["conversations"]) // 2)}


def test_s3_vllm_backends_agree_with_transformers(ray_cluster, tiny_models, world, s3_server):
    """Same seeds -> same noise on both backends: vLLM's greedy image-weakened answers from the
    very same noisy embeddings equal the transformers run's, item by item."""
    from bpo_ray.generate.pipeline import run_generate

    if "transformers" not in RESULTS:
        pytest.skip("needs the transformers run of this module")
    root = storage.join(s3_server["root"], "gen-vllm")
    storage.upload_dir(world, storage.join(root, "world"))
    out = storage.join(root, "out")
    cfg = load_config("tiny", overrides(
        tiny_models, **{"generate.strategies": "[image_weakened, error_injection]", "generate.max_items": 24,
                        "generate.sampler.backend": "vllm", "generate.injector.backend": "vllm"}))
    manifest = run_generate(cfg, storage.join(root, "world", "train.jsonl"), out)
    c = manifest.counts
    assert c.items_in == 24 and c.quarantined == 0 and c.paired + c.filtered == 24
    assert c.by_strategy.get("image_weakened", 0) > 0 and c.by_strategy.get("error_injection", 0) > 0
    check_accounting(out, 24)
    pairs = read_parquet(storage.join(out, "pairs"), PAIR_SCHEMA).to_pylist()
    assert all(p["image"].startswith("s3://bpo-test/gen-vllm/world/images/") for p in pairs)
    assert {json.loads(p["sampling"])["backend"] for p in pairs} == {"vllm"}
    vllm = {(p["source_id"], p["noise_step"]): p["rejected"] for p in pairs if p["strategy"] == "image_weakened"}
    vllm_items = {it["item_id"] for it in read_source(os.path.join(world, "train.jsonl"), max_items=24).items}
    shared = vllm_items & RESULTS["transformers_items"]
    hf = {k: v for k, v in RESULTS["transformers"].items() if k[0] in shared}
    assert len(hf) >= 5
    assert {k: v for k, v in vllm.items() if k[0] in shared} == hf


def test_killed_job_resumes_without_duplicates_or_losses(ray_cluster, tiny_models, world, tmp_path):
    """A job killed mid-run (SIGKILL of its driver) and started again with the same --out ends
    with every item accounted for exactly once; finished shards are not redone."""
    from bpo_ray.generate.pipeline import run_generate

    out = str(tmp_path / "out")
    source = os.path.join(world, "train.jsonl")
    n_items = 48
    args = overrides(tiny_models, **{"generate.strategies": "[image_weakened]", "generate.shard_size": 4,
                                     "generate.max_items": n_items, "generate.sampler.sampling.max_new_tokens": 32,
                                     "generate.sampler.pool": "{min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 1}"})
    cmd = [sys.executable, "-m", "bpo_ray.cli", "generate", "--config", "tiny", "--source", source, "--out", out]
    for a in args:
        cmd += ["--set", a]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = ShardStore(out)
    try:
        wait_for(lambda: len(store.done_shards()) >= 1 or proc.poll() is not None, 240, "a committed shard", 0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = store.done_shards()
    total_shards = -(-n_items // 4)
    assert 1 <= len(done_before) < total_shards, "the job finished before it could be killed"
    snapshot = {f: Path(f).read_bytes() for m in store.markers()
                for f in [store.marker_uri(m["shard"]), *m["files"]]}

    cfg = load_config("tiny", args)
    manifest = run_generate(cfg, source, out)
    assert manifest.timings["shards_resumed"] == len(done_before)
    assert all(Path(f).read_bytes() == b for f, b in snapshot.items())  # finished shards not redone
    c = manifest.counts
    assert c.items_in == n_items and c.quarantined == 0 and c.paired + c.filtered == n_items
    check_accounting(out, n_items)
    pairs = read_parquet(os.path.join(out, "pairs"), PAIR_SCHEMA)
    per_item = Counter(pairs.column("source_id").to_pylist())
    assert max(per_item.values()) == 1  # one noise step: at most one pair per item, none duplicated


def _sampler_actors(state_name: str | None = None) -> list[dict]:
    import ray
    from ray._private import state  # the public state API needs the dashboard, which tests run without

    found = state.actors(job_id=ray.get_runtime_context().job_id, actor_state_name=state_name)
    return [a for a in found.values() if "ImageWeakenedSampler" in a.get("ActorClassName", "")]


def test_killed_actor_is_replaced_and_the_job_completes(ray_cluster, tiny_models, world, tmp_path):
    from bpo_ray.generate.pipeline import run_generate

    out = str(tmp_path / "out")
    source = os.path.join(world, "train.jsonl")
    n_items = 48
    # One item per batch and longer answers: the sampler, not the driver, sets the pace, so a
    # committed shard means the actor still has work left when it is killed.
    cfg = load_config("tiny", overrides(tiny_models, **{
        "generate.strategies": "[image_weakened]", "generate.shard_size": 4, "generate.max_items": n_items,
        "generate.sampler.sampling.max_new_tokens": 32,
        "generate.sampler.pool": "{min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 1}"}))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(m=run_generate(cfg, source, out)), daemon=True)
    runner.start()
    store = ShardStore(out)
    # ALIVE means the actor's constructor (model load) has finished: it is now taking batches.
    wait_for(lambda: _sampler_actors("ALIVE") or not runner.is_alive(), 240, "the sampler actor", 0.05)
    time.sleep(1.0)
    alive = _sampler_actors("ALIVE")
    assert runner.is_alive() and len(alive) == 1, "the job finished before the actor could be killed"
    killed_at = len(store.done_shards())
    os.kill(alive[0]["Pid"], signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and "m" in result
    assert killed_at < -(-n_items // 4), "the job finished before the actor was killed"
    c = result["m"].counts
    assert c.items_in == n_items and c.quarantined == 0 and c.paired + c.filtered == n_items
    check_accounting(out, n_items)
    actor = next(a for a in _sampler_actors() if a["ActorID"] == alive[0]["ActorID"])
    assert actor["NumRestarts"] >= 1 and actor["Pid"] != alive[0]["Pid"]  # replaced by a new process
