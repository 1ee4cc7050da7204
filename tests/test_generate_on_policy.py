"""On-policy strategy end to end on a real local Ray cluster (generate stage).

The test models are tiny and random-init: their answers are gibberish that names none of the bias
world's objects. So that verdicts, sentences and pairs are exercised for real, these runs give the
verifier a vocabulary the gibberish does use: every letter and digit is an "object" (a CHAIR
``synonyms.txt``), and a COCO instances file says which of them each image "contains" (seeded, 3
in 4). The records' own ``objects`` field is removed, so the annotations verifier reads the file;
the judge verifier asks a real OpenAI-compatible claim judge on loopback, through the project's
judge proxy, that answers from the same file. The tests check plumbing, verdicts, accounting,
resume and caching, not answer quality (docs/generate.md has the quality numbers).
"""

from __future__ import annotations

import json
import os
import random
import string
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.metrics.chair import ObjectMentionExtractor
from bpo_ray.generate.sentences import apply_verdicts, sentence_objects
from bpo_ray.generate.shards import ShardStore
from bpo_ray.generate.sources import read_source
from bpo_ray.schemas import PAIR_SCHEMA, QUARANTINE_SCHEMA, read_parquet
from on_policy_support import ClaimJudge, JudgeProxyServer, pixels_key
from test_generate_pipeline import check_accounting, overrides, world_records
from test_generate_units import write_bad_source

pytestmark = pytest.mark.slow
LETTERS = list(string.ascii_lowercase + string.digits)
TOKENS_ENV = "BPO_TEST_ONPOLICY_TOKENS"
KEY_ENV = "BPO_TEST_ONPOLICY_JUDGE_KEY"
# Set at import, before the session's Ray cluster starts, so its workers see them as a real
# cluster's nodes see theirs (keys are never passed through Ray).
os.environ.setdefault(TOKENS_ENV, "generate:onpolicy-test-token")
os.environ.setdefault(KEY_ENV, "onpolicy-test-token")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    from bpo_ray.world.build import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(str(out), n_scenes=24)
    return str(out)


@pytest.fixture(scope="module")
def letters(world, tmp_path_factory) -> dict:
    """synonyms.txt of letter "objects", a COCO instances file over the world's images, and the
    claim judge's view of the same (pixels -> objects)."""
    folder = tmp_path_factory.mktemp("letters")
    (folder / "synonyms.txt").write_text("\n".join(LETTERS) + "\n")
    images = sorted(Path(world, "images").glob("*.png"))
    rng = random.Random(0)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(LETTERS)]
    coco = {"images": [], "annotations": [], "categories": cats}
    truth, by_pixels = {}, {}
    for k, path in enumerate(images):
        present = sorted(rng.sample(LETTERS, 27))
        truth[path.name] = set(present)
        by_pixels[pixels_key(Image.open(path))] = set(present)
        coco["images"].append({"id": k + 1, "file_name": path.name})
        coco["annotations"] += [{"id": len(coco["annotations"]) + 1, "image_id": k + 1,
                                 "category_id": LETTERS.index(n) + 1} for n in present]
    (folder / "instances.json").write_text(json.dumps(coco))
    return {"synonyms": str(folder / "synonyms.txt"), "coco": str(folder / "instances.json"),
            "truth": truth, "by_pixels": by_pixels}


def source_without_objects(world: str, folder: Path, n: int, bad: bool) -> tuple[str, Counter, int]:
    records = [{k: v for k, v in r.items() if k != "objects"} for r in world_records(world, n)]
    if bad:
        path, expected, total = write_bad_source(folder, records, world)
        return str(path), expected, total
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(dict(r, image=os.path.join(world, r["image"]))) for r in records]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    total = sum(1 for r in records for t in r["conversations"] if t["from"] == "human")
    return str(folder / "train.jsonl"), Counter(), total


def on_policy_cfg(tiny_models, letters, **extra):
    base = {"generate.strategies": "[on_policy]", "generate.max_image_bytes": 100000,
            "generate.on_policy.num_samples": 3, "generate.on_policy.num_continuations": 3,
            "generate.on_policy.sampling.max_new_tokens": 16, "generate.on_policy.sampling.temperature": 1.0,
            "generate.on_policy.verifier.synonyms": letters["synonyms"],
            "generate.on_policy.verifier.annotations": letters["coco"],
            "generate.on_policy.pool": "{min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 8}",
            # gibberish has wild length ratios; the length filter is tested elsewhere
            "generate.filters.max_length_ratio": 1000}
    base.update(extra)
    return load_config("tiny", overrides(tiny_models, **base))


def recheck_verdicts(row: dict, letters: dict) -> dict:
    """Recompute the pair's verdicts from the COCO truth, independently of the stage's records."""
    ex = ObjectMentionExtractor({n: n for n in LETTERS})
    truth = letters["truth"][Path(row["image"]).name]
    out = {}
    for side in ("chosen", "rejected"):
        sents = sentence_objects(row[side], ex)
        out[side] = apply_verdicts(sents, {o: o in truth for _, objs in sents for o in objs})
    return out


def pair_rows(out: str) -> list[dict]:
    if not os.path.isdir(os.path.join(out, "pairs")):  # a run that wrote no pair
        return []
    return sorted(read_parquet(storage.join(out, "pairs"), PAIR_SCHEMA).to_pylist(), key=lambda r: r["id"])


def test_sentence_pairs_with_annotations_bad_input_and_resume(ray_cluster, tiny_models, world, letters, tmp_path):
    from bpo_ray.generate.pipeline import run_generate

    source, expected_quarantine, total = source_without_objects(world, tmp_path / "src", 12, bad=True)
    out = str(tmp_path / "out")
    cfg = on_policy_cfg(tiny_models, letters)
    manifest = run_generate(cfg, source, out)
    c = manifest.counts
    # the bad source's one usable item shows ok.png, which the annotations file does not list
    expected_quarantine["no_annotations"] += 1
    assert c.items_in == total and c.quarantined == sum(expected_quarantine.values())
    got = {k.split(".", 1)[1]: v for k, v in c.by_reason.items() if k.startswith("quarantine.")}
    assert got == dict(expected_quarantine)
    assert c.paired > 0 and c.paired + c.filtered + c.quarantined == total
    assert c.by_strategy == {"on_policy": c.pairs_written}
    filtered = {k for k in c.by_reason if k.startswith("filter.")}
    assert filtered <= {"filter.no_hallucination", "filter.no_grounded_continuation", "filter.identical_to_chosen",
                        "filter.no_content_change", "filter.duplicate_negative", "filter.empty"}, c.by_reason
    check_accounting(out, total)
    quarantine = read_parquet(storage.join(out, "quarantine"), QUARANTINE_SCHEMA)
    assert Counter(quarantine.column("reason").to_pylist()) == expected_quarantine
    assert {"read", "image", "on_policy"} == set(quarantine.column("stage").to_pylist())

    prompts = {it["item_id"]: it["llava_prompt"] for it in read_source(source).items if it["status"] == "ok"}
    rows = pair_rows(out)
    for row in rows:
        rec = json.loads(row["sampling"])
        assert row["strategy"] == "on_policy" and rec["verifier"] == "annotations" and rec["pair_level"] == "sentence"
        assert row["generator"] == tiny_models["mllm"]
        # the prompt is the item's prompt plus the shared grounded prefix (the sample's first sentences)
        base = prompts[row["source_id"]]
        assert row["prompt"].startswith(base)
        prefix = row["prompt"][len(base):].strip()
        assert len(rec["prefix_verdicts"]) == rec["prefix_sentences"]
        assert prefix == " ".join(s for s, _ in rec["prefix_verdicts"])
        assert all(p for _, v in rec["prefix_verdicts"] for _, p in v)
        # chosen: grounded to the end, naming a real object; rejected: starts at a hallucinated sentence
        v = recheck_verdicts(row, letters)
        assert not any(s.hallucinated for s in v["chosen"]) and sum(s.grounded_objects for s in v["chosen"]) > 0
        assert v["rejected"][0].hallucinated
        assert [s.as_json() for s in v["chosen"]] == rec["chosen_verdicts"]
        assert [s.as_json() for s in v["rejected"]] == rec["rejected_verdicts"]

    # Resume after an interrupted run: a shard whose files were written but whose marker was not
    # is redone under the same names, with the same pairs.
    store = ShardStore(out)
    shard = max(m["shard"] for m in store.markers() if m["pairs_written"])
    os.remove(store.marker_uri(shard))
    before = pair_rows(out)
    again = run_generate(cfg, source, out)
    assert again.timings["shards_resumed"] == again.timings["shards"] - 1
    assert again.counts == manifest.counts and pair_rows(out) == before
    check_accounting(out, total)


def test_response_pairs_with_judge_verifier_through_proxy_and_its_cache(ray_cluster, tiny_models, world, letters,
                                                                        tmp_path):
    from bpo_ray.generate.pipeline import run_generate

    judge = ClaimJudge(letters["by_pixels"])
    proxy = JudgeProxyServer(judge.url, str(tmp_path / "judge.sqlite"), TOKENS_ENV)
    try:
        source, _, total = source_without_objects(world, tmp_path / "src", 8, bad=False)
        cfg = on_policy_cfg(tiny_models, letters, **{
            "generate.on_policy.pair_level": "response", "generate.on_policy.verifier.kind": "judge",
            "generate.on_policy.verifier.judge_url": proxy.url, "generate.on_policy.verifier.judge_model": "claim-judge",
            "generate.on_policy.verifier.judge_token_env": KEY_ENV})
        first = run_generate(cfg, source, str(tmp_path / "a"))
        calls = first.counts.by_reason.get("stat.judge_calls", 0)
        assert calls == len(judge.claims) > 0
        assert first.counts.by_reason.get("stat.judge_cache_hits", 0) == 0
        assert first.counts.paired > 0 and first.counts.items_in == total
        check_accounting(str(tmp_path / "a"), total)
        for row in pair_rows(str(tmp_path / "a")):
            rec = json.loads(row["sampling"])
            assert rec["verifier"] == "judge" and rec["pair_level"] == "response"
            assert row["prompt"].endswith("ASSISTANT:")
            v = recheck_verdicts(row, letters)  # the judge's verdicts are the file's truth
            assert [s.as_json() for s in v["chosen"]] == rec["chosen_verdicts"]
            assert [s.as_json() for s in v["rejected"]] == rec["rejected_verdicts"]
            hall = {side: sum(s.hallucinated_objects for s in v[side]) for side in v}
            assert hall["rejected"] - hall["chosen"] >= 1 and sum(s.grounded_objects for s in v["chosen"]) > 0
        # the same run again (another output): same pairs, every claim answered by the proxy's cache
        second = run_generate(cfg, source, str(tmp_path / "b"))
        assert second.counts.by_reason["stat.judge_cache_hits"] == second.counts.by_reason["stat.judge_calls"] == calls
        assert len(judge.claims) == calls
        assert pair_rows(str(tmp_path / "a")) == pair_rows(str(tmp_path / "b"))

        # judge outage: retried, then every item that needed a verdict is quarantined with the reason
        # (straight to the upstream: the proxy would answer these claims from its cache)
        judge.mode = "error"
        cfg_down = cfg.model_copy(deep=True)
        cfg_down.generate.on_policy.verifier.judge_url = judge.url
        cfg_down.generate.on_policy.verifier.max_retries = 1
        down = run_generate(cfg_down, source, str(tmp_path / "c"))
        c = down.counts
        assert c.quarantined > 0 and c.by_reason["quarantine.judge_unavailable"] == c.quarantined
        assert c.paired + c.filtered + c.quarantined == total
        quarantine = read_parquet(storage.join(str(tmp_path / "c"), "quarantine"), QUARANTINE_SCHEMA)
        assert set(quarantine.column("reason").to_pylist()) == {"judge_unavailable"}
        assert set(quarantine.column("stage").to_pylist()) == {"on_policy"}
    finally:
        proxy.close()
        judge.close()


def test_samples_are_seeded_and_an_adapter_changes_the_policy(ray_cluster, tiny_models, world, letters, tmp_path):
    from bpo_ray.generate.pipeline import run_generate
    from serve_support import make_lora_adapter

    source, _, total = source_without_objects(world, tmp_path / "src", 6, bad=False)
    cfg = on_policy_cfg(tiny_models, letters, **{"generate.on_policy.pair_level": "response"})
    a = run_generate(cfg, source, str(tmp_path / "a"))
    b = run_generate(cfg, source, str(tmp_path / "b"))
    assert a.counts == b.counts and pair_rows(str(tmp_path / "a")) == pair_rows(str(tmp_path / "b"))
    adapter = make_lora_adapter(tiny_models["mllm"], tmp_path / "adapter")
    cfg_ad = cfg.model_copy(deep=True)
    cfg_ad.generate.on_policy.adapter = adapter
    ad = run_generate(cfg_ad, source, str(tmp_path / "ad"))
    assert ad.counts.items_in == total
    rows = pair_rows(str(tmp_path / "ad"))
    assert rows and all(r["generator"] == f"{tiny_models['mllm']}+{adapter}" for r in rows)
    base_texts = {r["rejected"] for r in pair_rows(str(tmp_path / "a"))} | {r["chosen"] for r in pair_rows(str(tmp_path / "a"))}
    assert not base_texts & ({r["rejected"] for r in rows} | {r["chosen"] for r in rows})
    with pytest.raises(ValueError, match="adapter"):
        bad = cfg.model_copy(deep=True)
        bad.generate.on_policy.adapter = str(tmp_path / "no-such-adapter")
        run_generate(bad, source, str(tmp_path / "x"))


def test_iterate_rounds_use_the_previous_policy_and_resume_by_marker(ray_cluster, tiny_models, world, letters, tmp_path):
    """RLAIF-V's rounds: round 1 samples from round 0's merged policy; finished stages are skipped
    on a rerun, an unfinished one (its marker missing, as after a kill) is redone."""
    from bpo_ray.iterate import marker_uri, run_iterate

    source, _, _ = source_without_objects(world, tmp_path / "src", 6, bad=False)
    cfg = on_policy_cfg(tiny_models, letters, **{
        "generate.on_policy.pair_level": "response", "train.mode": "dpo", "train.num_workers": 1,
        "train.per_device_batch_size": 4, "train.max_steps": 2, "train.checkpoint_every": 100, "train.lr": 5e-3,
        "train.warmup_ratio": 0})
    out = str(tmp_path / "iter")
    logs: list[str] = []
    first = run_iterate(cfg, source, out, rounds=1, log=logs.append)
    assert [line.split(": ", 1)[1].split(" ")[0] for line in logs] == ["generate", "train", "merge"]
    logs.clear()
    both = run_iterate(cfg, source, out, rounds=2, log=logs.append)
    assert all("round 1" in line for line in logs) and len(logs) == 3  # round 0 is not redone
    assert both["rounds"][0] == first["rounds"][0]
    r1 = pair_rows(storage.join(out, "round-1", "generate"))
    assert r1 and {r["generator"] for r in r1} == {first["final_policy"]}
    assert both["rounds"][1]["policy"] == first["final_policy"] != both["final_policy"]
    # a run killed after round 1's training: only the merge is redone
    os.remove(marker_uri(out, 1, "policy"))
    logs.clear()
    again = run_iterate(cfg, source, out, rounds=2, log=logs.append)
    assert len(logs) == 1 and "merge" in logs[0] and again["final_policy"] == both["final_policy"]
    assert json.loads(Path(out, "iterate.json").read_text())["final_policy"] == both["final_policy"]
    with pytest.raises(ValueError, match="on_policy"):
        bad = cfg.model_copy(deep=True)
        bad.generate.strategies = ["image_weakened"]
        run_iterate(bad, source, out, rounds=1)


def test_vllm_backend_samples_seeded_and_pairs(ray_cluster, tiny_models, world, letters, tmp_path):
    """The same strategy with the LM in vLLM (CPU): seeded per request, so a rerun (a new engine)
    writes the same pairs; greedy sampling agrees with transformers token for token."""
    from bpo_ray.generate.pipeline import run_generate

    source, _, total = source_without_objects(world, tmp_path / "src", 6, bad=False)
    extra = {"generate.sampler.backend": "vllm"}
    cfg = on_policy_cfg(tiny_models, letters, **extra, **{"generate.on_policy.pair_level": "response"})
    a = run_generate(cfg, source, str(tmp_path / "a"))
    assert a.counts.items_in == total and a.counts.paired > 0
    rows = pair_rows(str(tmp_path / "a"))
    assert {json.loads(r["sampling"])["backend"] for r in rows} == {"vllm"}
    b = run_generate(cfg, source, str(tmp_path / "b"))
    assert b.counts == a.counts and pair_rows(str(tmp_path / "b")) == rows
    # greedy sentence-level pairs (one sample, one continuation): both backends, the same pairs
    greedy = {"generate.on_policy.sampling.temperature": 0, "generate.on_policy.num_samples": 1,
              "generate.on_policy.num_continuations": 1}
    v = run_generate(on_policy_cfg(tiny_models, letters, **{**extra, **greedy}), source, str(tmp_path / "gv"))
    t = run_generate(on_policy_cfg(tiny_models, letters, **greedy), source, str(tmp_path / "gt"))
    # the outcome of every item (paired, or filtered by which reason) follows from the greedy
    # samples' verdicts, so equal counts by reason mean the two backends sampled alike
    assert v.counts == t.counts and v.counts.paired + v.counts.filtered == total
    strip = lambda rows: sorted(({k: r[k] for k in ("source_id", "prompt", "chosen", "rejected")} for r in rows),  # noqa: E731
                                key=lambda r: r["source_id"])
    assert strip(pair_rows(str(tmp_path / "gv"))) == strip(pair_rows(str(tmp_path / "gt")))
