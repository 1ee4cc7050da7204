"""The evaluate stage end to end: the real serve stack, the real ``openai`` client, real Ray Data.

* The model: the serve stage's model app on Ray Serve (transformers backend) with the tiny
  random-init LLaVA as "base" and a random LoRA adapter as "bpo-both".
* The judge: the serve stage's judge proxy on Ray Serve, forwarding to a judge upstream on
  loopback. There is no GPT-4 here, so the upstream is a deterministic rule-based grader speaking
  the OpenAI chat API: it grades by word overlap with the reference, in each benchmark's reply
  format, and on detailed-description questions its first grade has no number, so MM-Vet's
  re-ask path runs.

Every number the stage reports is recomputed here from its per-item output with the scorers and
with the judge's own rule, so a wrong mapping between items, answers and grades fails.
Secrets are this test's own random values; the Serve replicas get theirs through the environment
they inherit (set at import time, before the session's ``ray.init``), as in test_serve.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import uuid
from pathlib import Path

import pytest

from conftest import free_port
from serve_support import make_lora_adapter
from tests.serve_support import AppServer

pytestmark = pytest.mark.slow

TOKENS_ENV = "BPO_TEST_EVAL_JUDGE_TOKENS"
UPSTREAM_KEY_ENV = "BPO_TEST_EVAL_UPSTREAM_KEY"
CLIENT_TOKEN = "tok-eval-" + secrets.token_hex(12)
UPSTREAM_KEY = "sk-eval-upstream-" + secrets.token_hex(12)
os.environ[TOKENS_ENV] = f"evaluate:{CLIENT_TOKEN}"
os.environ[UPSTREAM_KEY_ENV] = UPSTREAM_KEY
N_ITEMS = 6


# ---------------------------------------------------------------------------------------------
# The judge upstream




def _completion(model: str, text: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


_WORD = re.compile(r"[a-z]+")


def overlap(reference: str, prediction: str) -> float:
    """Share of the reference's distinct words that the prediction contains."""
    ref = set(_WORD.findall(reference.lower()))
    return len(ref & set(_WORD.findall(prediction.lower()))) / len(ref) if ref else 0.0


def rule_grade(reference: str, prediction: str) -> float:
    return round(overlap(reference, prediction), 1)


def rule_review(context: str, reference: str, candidate: str) -> tuple[int, int]:
    return 1 + round(9 * overlap(context, reference)), 1 + round(9 * overlap(context, candidate))


def rule_judge_app(upstream_key: str, vocabulary: list[str]):
    """The judge upstream: answers MM-Vet grading, LLaVA-Bench reviews and CHAIR object lists."""
    from fastapi import FastAPI, Header, HTTPException

    app = FastAPI()
    app.state.requests = 0

    @app.post("/v1/chat/completions")
    def chat(body: dict, authorization: str = Header("")) -> dict:
        if authorization != f"Bearer {upstream_key}":
            raise HTTPException(401, "bad token")
        app.state.requests += 1
        content = body["messages"][-1]["content"]
        if content.startswith("You grade answers of AI assistants"):
            retry = content.endswith("(digit): ")
            row = content.rstrip().removesuffix("Predict the correctness of the answer (digit):").rstrip().splitlines()[-1]
            question, reference, prediction = [c.strip() for c in row.split(" | ")[:3]]
            if "detail" in question.lower() and not retry:  # caption prompts: first reply has no number
                return _completion(body["model"], "The grade is")
            return _completion(body["model"], f"{rule_grade(reference, prediction):.1f}")
        if "[Assistant 1]" in content:
            context = content.split("[Context]\n", 1)[1].split("\n\n[Question]", 1)[0]
            reference = content.split("[Assistant 1]\n", 1)[1].split("\n\n[End of Assistant 1]", 1)[0]
            candidate = content.split("[Assistant 2]\n", 1)[1].split("\n\n[End of Assistant 2]", 1)[0]
            first, second = rule_review(context, reference, candidate)
            return _completion(body["model"], f"{first} {second}\nBoth answers were compared with the context.")
        if "List every physical object" in content:
            description = content.split("Description:\n", 1)[1].rsplit("\n\nObjects:", 1)[0]
            found = [w for w in vocabulary if re.search(rf"\b{w}s?\b", description.lower())]
            return _completion(body["model"], ", ".join(found) or "none")
        raise HTTPException(400, "unknown judge request")

    return app


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A small bias world whose first test image is deleted, so its items must fail cleanly."""
    from bpo_ray.world.build import build_world

    out = tmp_path_factory.mktemp("eval_world")
    meta = build_world(str(out), seed=0, n_scenes=60, corpus_lines=50)
    test_records = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    missing = sorted(r["image"] for r in test_records)[0]
    (out / missing).unlink()
    return {"dir": str(out), "missing": str(out / missing), "objects": meta["vocab"]["objects"]}


@pytest.fixture(scope="module")
def servers(ray_cluster, tiny_models, world, tmp_path_factory):
    """Model app + judge proxy on Ray Serve; the proxy's upstream is the rule-based judge."""
    from ray import serve

    from bpo_ray.config import load_config
    from bpo_ray.serving.apps import with_adapters
    from bpo_ray.serving.deploy import start_serving

    tmp = tmp_path_factory.mktemp("eval_serve")
    adapter = make_lora_adapter(tiny_models["mllm"], tmp / "bpo-both")
    judge = rule_judge_app(UPSTREAM_KEY, world["objects"])
    with AppServer(judge, suffix="/v1") as upstream_url:
        port = free_port()
        cfg = with_adapters(load_config("tiny", [
            f"models.mllm={tiny_models['mllm']}", f"serve.port={port}", "serve.model.max_tokens=64",
            f"serve.judge.upstream_base_url={upstream_url}", f"serve.judge.upstream_key_env={UPSTREAM_KEY_ENV}",
            f"serve.judge.client_tokens_env={TOKENS_ENV}", f"serve.judge.cache_path={tmp / 'judge.sqlite'}",
        ]), {"bpo-both": adapter})
        started = time.perf_counter()
        urls = start_serving(cfg)
        print(f"\nserve stack up in {time.perf_counter() - started:.1f}s")
        # set for the module, then as it was (the suite default from conftest stays for later modules)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("BPO_JUDGE_TOKEN", CLIENT_TOKEN)  # the evaluate driver's own credential
            try:
                yield {"model": urls.model, "judge": urls.judge, "judge_app": judge}
            finally:
                serve.shutdown()


def _config(world_dir: str, *overrides: str):
    from bpo_ray.config import load_config

    return load_config("tiny", [f"evaluate.world={world_dir}", f"evaluate.max_items={N_ITEMS}",
                                "evaluate.max_tokens=24", "evaluate.concurrency=4", *overrides])


def _items(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "items.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Tests


def test_every_benchmark_through_model_and_judge(ray_cluster, servers, world, tmp_path):
    from bpo_ray.metrics.chair import score_chair
    from bpo_ray.metrics.pope import score_pope
    from bpo_ray.evaluate import evaluate, write_report
    from bpo_ray.evaluate.benchmarks.llava_bench import relative_scores
    from bpo_ray.evaluate.benchmarks.mmvet import capability_totals

    cfg = _config(world["dir"], "evaluate.benchmarks=[chair,pope,mmvet,llava_bench]", "evaluate.chair.extractor=judge")
    started = time.perf_counter()
    metrics = evaluate(cfg, servers["model"], "base", servers["judge"], str(tmp_path), progress=False)
    wall = time.perf_counter() - started

    items = _items(tmp_path / "base")
    by_bench = {name: [i for i in items if i["benchmark"] == name] for name in ("chair", "pope", "mmvet", "llava_bench")}
    assert set(metrics["benchmarks"]) == set(by_bench)
    assert all(by_bench.values())

    # The deleted image fails its items with a reason; nothing else fails, nothing is lost.
    for name, rows in by_bench.items():
        failed = [r for r in rows if r["error"]]
        assert {r["error"] for r in failed} <= {"missing_image"}
        assert {r["image"] for r in failed} <= {world["missing"]}
        counts = metrics["counts"][name]
        assert counts["items"] == len(rows) and counts["failed"] == len(failed)
        assert counts["scored"] == len(rows) - len(failed) > 0
        assert metrics["failures"][name] == ({"missing_image": len(failed)} if failed else {})
    assert any(r["error"] for r in items), "the missing image should have produced failures"
    ok = {name: [r for r in rows if not r["error"]] for name, rows in by_bench.items()}
    assert all(r["answer"] is not None and r["latency_s"] > 0 for rows in ok.values() for r in rows)

    # CHAIR from the judge's object lists (one name per listed object), recomputed with the scorer.
    chair_rows = ok["chair"]
    synonyms = json.loads((Path(world["dir"]) / "world.json").read_text())["synonyms"]
    expected = score_chair([" . ".join(json.loads(r["judge_value"])) for r in chair_rows],
                           [r["meta"]["objects"] for r in chair_rows], synonyms)
    assert metrics["benchmarks"]["chair"]["chair_i"] == pytest.approx(expected.chair_i)
    assert metrics["benchmarks"]["chair"]["chair_s"] == pytest.approx(expected.chair_s)
    assert metrics["benchmarks"]["chair"]["extractor"] == "judge"

    # POPE: three splits, each recomputed from the raw answers.
    pope_rows = ok["pope"]
    expected_pope = score_pope([{"split": r["meta"]["split"], "label": r["meta"]["label"]} for r in pope_rows],
                               [r["answer"] for r in pope_rows])
    assert set(expected_pope) == {"random", "popular", "adversarial"}
    for split, scores in expected_pope.items():
        assert metrics["benchmarks"]["pope"][split]["f1"] == pytest.approx(scores.f1)
        assert metrics["benchmarks"]["pope"][split]["n"] == scores.n <= N_ITEMS

    # MM-Vet: every grade is the judge's rule on (reference, answer); description items needed a re-ask.
    mm_rows = ok["mmvet"]
    grades = [rule_grade(r["reference"], r["answer"]) for r in mm_rows]
    assert [json.loads(r["judge_value"]) for r in mm_rows] == pytest.approx(grades)
    assert any("detail" in r["question"] for r in mm_rows) and any("detail" not in r["question"] for r in mm_rows)
    for r in mm_rows:
        assert r["judge_attempts"] == (2 if "detail" in r["question"].lower() else 1)
    expected_mm = capability_totals(grades, [r["meta"]["capabilities"] for r in mm_rows])
    assert metrics["benchmarks"]["mmvet"]["total"] == pytest.approx(expected_mm["total"])
    assert metrics["benchmarks"]["mmvet"]["per_capability"] == pytest.approx(expected_mm["per_capability"])

    # LLaVA-Bench: reference = Assistant 1, candidate = Assistant 2, ratio of means per category.
    lb_rows = ok["llava_bench"]
    pairs = [rule_review(r["meta"]["context"], r["reference"], r["answer"]) for r in lb_rows]
    assert [json.loads(r["judge_value"]) for r in lb_rows] == [list(p) for p in pairs]
    expected_lb = relative_scores(pairs, [r["category"] for r in lb_rows])
    assert metrics["benchmarks"]["llava_bench"]["all"]["relative"] == pytest.approx(expected_lb["all"]["relative"])
    assert set(metrics["benchmarks"]["llava_bench"]["per_category"]) == {"conv", "detail", "complex"}

    assert (tmp_path / "base" / "skipped.jsonl").read_text() == ""  # every world record made an item
    # metrics.json on disk is what evaluate returned; the report renders it.
    assert json.loads((tmp_path / "base" / "metrics.json").read_text())["benchmarks"] == json.loads(json.dumps(metrics["benchmarks"]))
    written = write_report({"base": metrics}, str(tmp_path / "report"))
    markdown = Path(written["report.md"]).read_text()
    assert f"{100 * metrics['benchmarks']['chair']['chair_i']:.1f}" in markdown
    assert Path(written["plots/headline.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nevaluate wall {wall:.1f}s for {len(items)} items; upstream judge requests "
          f"{servers['judge_app'].state.requests}; metrics timings {metrics['timings']}")


def test_objhal_and_amber_on_the_world_files(ray_cluster, servers, world, tmp_path):
    """Object HalBench and AMBER with ``source: world``: the world's test split in the public file
    formats, read by the public loaders, answered by the served model; every number recomputed
    from the answers with the reference-parity scorers and the written files."""
    from bpo_ray.evaluate import evaluate
    from bpo_ray.evaluate.benchmarks import amber as amber_bench
    from bpo_ray.metrics.amber import score_discriminative
    from bpo_ray.metrics.objhal import ObjHalExtractor, score_objhal
    from bpo_ray.metrics.wordnet import NounLemmatizer

    cfg = _config(world["dir"], "evaluate.benchmarks=[objhal,amber]", "evaluate.objhal.max_items=5", "evaluate.objhal.max_tokens=24",
                  "evaluate.amber.max_items=9")
    metrics = evaluate(cfg, servers["model"], "base", None, str(tmp_path), progress=False)
    items = _items(tmp_path / "base")
    rows = {name: [i for i in items if i["benchmark"] == name] for name in ("objhal", "amber")}
    assert [len(rows["objhal"]), len(rows["amber"])] == [5, 9]  # 3 AMBER queries a scene
    assert metrics["sources"] == {"objhal": "world", "amber": "world"}
    for name, got in rows.items():  # the deleted image fails its items with a reason, nothing is lost
        failed = [r for r in got if r["error"]]
        assert {r["error"] for r in failed} <= {"missing_image"} and {r["image"] for r in failed} <= {world["missing"]}
        assert metrics["counts"][name] == {"items": len(got), "scored": len(got) - len(failed),
                                           "failed": len(failed), "skipped_at_load": 0}
    assert any(r["error"] for r in items)

    files = Path(world["dir"]) / "public"
    extractor = ObjHalExtractor((files / "objhal" / "synonyms.txt").read_text().splitlines(),
                                NounLemmatizer.from_dir(str(files / "objhal" / "wordnet")))
    ok = [r for r in rows["objhal"] if not r["error"]]
    expected = score_objhal([r["answer"] for r in ok], [r["meta"]["objects"] for r in ok], extractor).summary()
    for key in ("CHAIRs_refine", "CHAIRi", "obj_rec"):
        assert metrics["benchmarks"]["objhal"][key] == pytest.approx(expected[key]), key

    ok = [r for r in rows["amber"] if not r["error"]]
    disc = [(r["meta"]["type"], r["meta"]["truth"], r["answer"]) for r in ok if r["meta"]["type"] != "generative"]
    assert {t for _, t, _ in disc} == {"yes", "no"}
    got = metrics["benchmarks"]["amber"]
    assert got["discriminative"] == score_discriminative(disc)
    assert got["discriminative_normalized"] == score_discriminative(
        (k, t, amber_bench.normalized_yes_no(a)) for k, t, a in disc)
    assert set(got["generative"]) == {"CHAIR", "Cover", "Hal", "Cog"} and got["similarity"] == "none"


def test_cli_runs_one_model_at_a_time_into_one_report(ray_cluster, servers, world, tmp_path, capsys):
    """Two models evaluated by ``bpo-ray evaluate`` into one --out: the report compares both."""
    from bpo_ray.cli import main

    out = tmp_path / "eval"
    common = ["--config", "tiny", "--set", f"evaluate.world={world['dir']}", "--set", "evaluate.max_items=4",
              "--set", "evaluate.max_tokens=16", "--model-url", servers["model"], "--out", str(out)]
    assert main(["evaluate", *common, "--model", "base"]) == 0
    assert main(["evaluate", *common, "--model", "bpo-both"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "bpo-both"} and report["baseline"] == "base"
    assert report["config"]["evaluate"]["max_items"] == 4
    # The adapter really answers differently, and each report cell is its value and its change vs base.
    answers = {name: {r["id"]: r["answer"] for r in _items(out / name)} for name in ("base", "bpo-both")}
    assert answers["base"].keys() == answers["bpo-both"].keys()
    assert answers["base"] != answers["bpo-both"]
    markdown = (out / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Model |"))
    row = next(line for line in markdown.splitlines() if line.startswith("| bpo-both |"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    for label, value in report["headline"]["bpo-both"].items():
        delta = value - report["headline"]["base"][label]
        assert cells[label] == f"{value:.1f} ({'+' if delta >= 0 else '−'}{abs(delta):.1f})"
    assert {p.name for p in (out / "plots").iterdir()} >= {"headline.png", "pope_f1.png"}

    # --add: a benchmark added to a finished evaluation; the earlier ones keep their items and numbers.
    before = json.loads((out / "base" / "metrics.json").read_text())
    added = ["--set", "evaluate.benchmarks=[objhal]", "--set", "evaluate.objhal.max_tokens=16"]
    assert main(["evaluate", *common, "--model", "base", *added, "--add"]) == 0
    after = json.loads((out / "base" / "metrics.json").read_text())
    assert set(after["benchmarks"]) == {"chair", "pope", "objhal"}
    assert {k: after["benchmarks"][k] for k in ("chair", "pope")} == before["benchmarks"]
    assert after["config"]["benchmarks"] == ["chair", "pope", "objhal"] and after["counts"]["objhal"]["items"] == 4
    assert [r["benchmark"] for r in _items(out / "base")].count("objhal") == 4
    assert len(_items(out / "base")) == sum(c["items"] for c in after["counts"].values())
    assert "ObjHal Resp ↓" in json.loads((out / "report.json").read_text())["headline"]["base"]
    # ... refused when a setting every benchmark depends on differs, and nothing is overwritten
    assert main(["evaluate", *common[:-2], "--set", "evaluate.max_tokens=12", "--out", str(out),
                 "--model", "base", *added, "--add"]) == 2
    assert "other evaluate settings (max_tokens)" in capsys.readouterr().err
    assert json.loads((out / "base" / "metrics.json").read_text()) == after

    # A model the server does not have is a clear error before any work, not a pile of failures.
    assert main(["evaluate", *common, "--model", "no-such-model"]) == 2
    assert "not served" in capsys.readouterr().err
    assert not (out / "no-such-model").exists()
