"""The judged benchmarks end to end with the world's annotator as the judge (what ``bpo-ray demo`` runs).

The serve stage's model app (tiny LLaVA, transformers backend) and judge proxy on Ray Serve; the
proxy's upstream is the world's annotator (``bpo_ray.world.judge_server``) on loopback, indexing a
small bias world. MM-Vet, LLaVA-Bench and MMHal-Bench run through Ray Data with the real ``openai``
client. Every judge value is recomputed here by asking the annotator's rules directly with the
prompt the benchmark builds, so a wrong pairing of items, answers and grades fails; the judge
proxy's usage figures in the metrics must equal the judge calls the items record, and a second
run of the same model (through the CLI, as the demo runs it) is answered from the proxy's cache.
Secrets are set at import time, before the session's ``ray.init``, so Serve replicas inherit them.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from conftest import free_port
from tests.serve_support import AppServer

pytestmark = pytest.mark.slow

TOKENS_ENV = "BPO_TEST_WJ_E2E_TOKENS"
CLIENT_TOKEN = "tok-wj-" + secrets.token_hex(12)
os.environ[TOKENS_ENV] = f"evaluate:{CLIENT_TOKEN}"
N_ITEMS = 6
JUDGED = "evaluate.benchmarks=[mmvet,llava_bench,mmhal]"




@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    from bpo_ray.world.build import build_world

    out = tmp_path_factory.mktemp("wj_world")
    build_world(str(out), seed=0, n_scenes=60, corpus_lines=50)
    return str(out)


@pytest.fixture(scope="module")
def servers(ray_cluster, tiny_models, world, tmp_path_factory):
    from ray import serve

    from bpo_ray.config import load_config
    from bpo_ray.serving.deploy import start_serving
    from bpo_ray.world.judge_server import SceneIndex, create_app

    tmp = tmp_path_factory.mktemp("wj_serve")
    with AppServer(create_app(SceneIndex(world)), suffix="/v1") as annotator_url:
        cfg = load_config("tiny", [
            f"models.mllm={tiny_models['mllm']}", f"serve.port={free_port()}", "serve.model.max_tokens=64",
            f"serve.judge.upstream_base_url={annotator_url}", "serve.judge.upstream_key_env=BPO_TEST_WJ_NO_KEY",
            f"serve.judge.client_tokens_env={TOKENS_ENV}", f"serve.judge.cache_path={tmp / 'judge.sqlite'}"])
        urls = start_serving(cfg)
        # set for the module, then as it was (the suite default from conftest stays for later modules)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("BPO_JUDGE_TOKEN", CLIENT_TOKEN)
            try:
                yield {"model": urls.model, "judge": urls.judge}
            finally:
                serve.shutdown()


def _items(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "items.jsonl").read_text().splitlines()]


def _annotator_value(row: dict):
    """What the annotator's rules give for this item's judge prompt (first attempt)."""
    from bpo_ray.evaluate.benchmarks import llava_bench, mmhal, mmvet
    from bpo_ray.world.annotator import answer_prompt

    flat = {**row, "meta": json.dumps(row["meta"])}
    if row["benchmark"] == "mmvet":
        return mmvet.parse_grade(answer_prompt(mmvet.grade_request(flat, 0).messages[0]["content"]).text)
    if row["benchmark"] == "llava_bench":
        return llava_bench.parse_score_pair(answer_prompt(llava_bench.review_request(flat, 0).messages[1]["content"]).text)
    return mmhal.parse_rating(answer_prompt(mmhal.judge_request(flat, 0).messages[0]["content"]).text)


def test_judged_benchmarks_with_the_world_annotator(ray_cluster, servers, world, tmp_path):
    from bpo_ray.cli import main
    from bpo_ray.config import load_config
    from bpo_ray.evaluate import evaluate
    from bpo_ray.evaluate.benchmarks import llava_bench, mmhal, mmvet

    overrides = [f"evaluate.world={world}", "evaluate.max_tokens=24", "evaluate.judge_model=bias-world-annotator",
                 *(f"evaluate.{b}.max_items={N_ITEMS}" for b in ("mmvet", "llava_bench", "mmhal")), JUDGED]
    out = tmp_path / "eval"
    metrics = evaluate(load_config("tiny", overrides), servers["model"], "base", servers["judge"], str(out), progress=False)

    assert metrics["counts"] == {b: {"items": N_ITEMS, "scored": N_ITEMS, "failed": 0, "skipped_at_load": 0}
                                 for b in ("mmvet", "llava_bench", "mmhal")}
    rows = _items(out / "base")
    assert all(r["answer"] and not r["error"] and not r["judge_error"] for r in rows)
    for r in rows:  # the proxy delivered the annotator's own verdict for each item's prompt
        assert json.loads(r["judge_value"]) == _annotator_value(r), r["id"]

    by = {b: [r for r in rows if r["benchmark"] == b] for b in ("mmvet", "llava_bench", "mmhal")}
    assert metrics["benchmarks"]["mmvet"]["total"] == pytest.approx(
        mmvet.capability_totals([json.loads(r["judge_value"]) for r in by["mmvet"]],
                                [r["meta"]["capabilities"] for r in by["mmvet"]])["total"])
    assert metrics["benchmarks"]["llava_bench"]["all"] == pytest.approx(
        llava_bench.relative_scores([json.loads(r["judge_value"]) for r in by["llava_bench"]],
                                    [r["category"] for r in by["llava_bench"]])["all"])
    expected = mmhal.summarize([json.loads(r["judge_value"]) for r in by["mmhal"]], [r["category"] for r in by["mmhal"]])
    got = metrics["benchmarks"]["mmhal"]
    assert (got["score"], got["hallucination_rate"]) == pytest.approx((expected["score"], expected["hallucination_rate"]))
    assert set(got["per_type"]) == {r["category"] for r in by["mmhal"]}

    # the proxy's figures for this run: one request per judge attempt, all went upstream (fresh cache)
    calls = sum(r["judge_attempts"] for r in rows)
    run = metrics["judge_usage"]["run"]
    assert run["requests"] == calls and run["upstream_requests"] == calls and run["cache_hits"] == 0
    assert run["errors"] == 0 and run["prompt_tokens"] > 100 * calls and run["cost_usd"] > 0

    # the demo's path: the CLI, same model again into the same --out: every judge request is a cache hit
    assert main(["evaluate", "--config", "tiny", *[a for o in overrides for a in ("--set", o)],
                 "--model-url", servers["model"], "--model", "base", "--judge-url", servers["judge"],
                 "--out", str(out)]) == 0
    again = json.loads((out / "base" / "metrics.json").read_text())
    assert again["benchmarks"]["mmhal"] == got
    assert again["judge_usage"]["run"]["cache_hits"] == calls and again["judge_usage"]["run"]["upstream_requests"] == 0
    report = (out / "report.md").read_text()
    assert "MMHal score (0-6)" in report and "## MMHal-Bench by question type" in report
    assert "## Judge proxy" in report and f"| base | {calls} | {calls} | 0 | 0 |" in report


def test_objhal_objects_listed_by_the_judge(ray_cluster, servers, world, tmp_path):
    """Object HalBench's judge path (the reference's --use_gpt): the judge proxy asks the world's
    annotator to list the objects of each answer; each listed name is read by the rule path."""
    from bpo_ray.config import load_config
    from bpo_ray.evaluate import evaluate
    from bpo_ray.evaluate.benchmarks import chair, objhal
    from bpo_ray.metrics.objhal import ObjHalReport, score_listed
    from bpo_ray.world.annotator import answer_prompt

    cfg = load_config("tiny", [f"evaluate.world={world}", "evaluate.max_tokens=24", "evaluate.objhal.max_tokens=24",
                               "evaluate.judge_model=bias-world-annotator", "evaluate.benchmarks=[objhal]",
                               f"evaluate.objhal.max_items={N_ITEMS}", "evaluate.objhal.extractor=judge"])
    metrics = evaluate(cfg, servers["model"], "base", servers["judge"], str(tmp_path), progress=False)
    rows = _items(tmp_path / "base")
    assert len(rows) == N_ITEMS and all(r["answer"] and not r["error"] and not r["judge_error"] for r in rows)
    extractor = objhal.make_extractor(objhal.load_world(world, cfg.evaluate.objhal, 1).info)
    items = []
    for r in rows:
        prompt = chair.object_list_request({**r, "meta": json.dumps(r["meta"])}, 0).messages[0]["content"]
        listed = json.loads(r["judge_value"])
        assert listed == chair.parse_object_list(answer_prompt(prompt).text), r["id"]
        items.append(score_listed(r["answer"], listed, r["meta"]["objects"], extractor))
    expected = ObjHalReport(items).summary()
    got = metrics["benchmarks"]["objhal"]
    assert got["extractor"] == "judge" and metrics["judge_usage"]["run"]["requests"] == N_ITEMS
    for key in ("CHAIRs", "CHAIRi", "obj_rec"):
        assert got[key] == pytest.approx(expected[key]), key
