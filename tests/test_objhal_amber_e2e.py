"""Object HalBench and AMBER through ``evaluate``: a real local Ray cluster runs the items against
a real OpenAI-compatible HTTP server on loopback (official ``openai`` client), which answers each
question with the reference fixtures' answers; every number in metrics.json must equal the
reference golden, and every input row is accounted for in items.jsonl / skipped.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve_support import AppServer

pytestmark = pytest.mark.slow
PARITY = Path(__file__).parent / "fixtures" / "parity"




def _answering_app(answers: dict[str, str]):
    """Chat server answering each question text with its scripted answer (images are checked to be
    sent as data URLs)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        parts = body["messages"][0]["content"]
        assert parts[0]["image_url"]["url"].startswith("data:image/")
        reply = answers[parts[1]["text"]]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

    return app


def test_objhal_and_amber_through_evaluate(ray_cluster, tmp_path):
    from PIL import Image

    from bpo_ray.config import load_config
    from bpo_ray.metrics.amber import score_discriminative
    from bpo_ray.evaluate import evaluate

    images = tmp_path / "images"
    images.mkdir()
    answers: dict[str, str] = {}
    # Object HalBench: one question per image, each worded uniquely so the server can answer it.
    texts = [json.loads(line)["text"] for line in (PARITY / "objhal" / "obj_halbench_answer.jsonl").read_text().splitlines()]
    questions = []
    for record, text in zip((json.loads(l) for l in (PARITY / "objhal" / "questions.jsonl").read_text().splitlines()), texts):
        record["question"] = f"Describe image {record['image_id']} in detail."
        answers[record["question"]] = text
        Image.new("RGB", (8, 8), (record["image_id"] % 256, 0, 0)).save(images / record["image_path"])
        questions.append(json.dumps(record))
    questions.append('{"image_id": 2001}')  # no question: skipped with a reason
    (tmp_path / "questions.jsonl").write_text("\n".join(questions) + "\n")
    # AMBER: the query file with unique wording, the fixture responses as answers.
    responses = {r["id"]: r["response"] for r in json.loads((PARITY / "amber" / "responses.json").read_text())}
    queries = json.loads((PARITY / "amber" / "query_all.json").read_text())
    for query in queries:
        query["query"] = f"{query['query']} (item {query['id']})"
        answers[query["query"]] = responses[query["id"]]
        if not (images / query["image"]).exists():
            Image.new("RGB", (8, 8), (0, query["id"], 0)).save(images / query["image"])
    (tmp_path / "queries.json").write_text(json.dumps(queries))

    o, a = PARITY / "objhal", PARITY / "amber"
    cfg = load_config("tiny", [
        "evaluate.benchmarks=[objhal,amber]", "evaluate.concurrency=4", "evaluate.max_tokens=512",
        "evaluate.objhal.source=objhal", "evaluate.amber.source=amber",
        f"evaluate.objhal.questions={tmp_path / 'questions.jsonl'}", f"evaluate.objhal.instances={o / 'instances_val2014.json'}",
        f"evaluate.objhal.captions={o / 'captions_val2014.json'}", f"evaluate.objhal.synonyms={o / 'synonyms_refine.txt'}",
        f"evaluate.objhal.wordnet={o / 'wordnet'}", f"evaluate.objhal.images={images}",
        f"evaluate.amber.annotations={a / 'annotations.json'}", f"evaluate.amber.queries={tmp_path / 'queries.json'}",
        f"evaluate.amber.images={images}",  # no relation.json: the generative queries are skipped, counted
    ])
    with AppServer(_answering_app(answers), suffix="/v1") as url:
        metrics = evaluate(cfg, url, "m", out=str(tmp_path / "eval"), progress=False)

    golden = json.loads((PARITY / "objhal_official_golden.json").read_text())["overall_metrics"]
    objhal = metrics["benchmarks"]["objhal"]
    for key in ("CHAIRs", "CHAIRs_refine", "CHAIRi", "obj_rec"):
        assert objhal[key] == golden[key], key
    printed = json.loads((PARITY / "amber_official_golden.json").read_text())["printed"]
    # The runner strips the model's reply, so the fixture's " No" arrives as "No" (one more correct
    # number answer); the existence items have no such answer and equal the golden as they are.
    assert metrics["benchmarks"]["amber"]["discriminative"]["existence"] == printed["Exsitence"]
    annotations = json.loads((PARITY / "amber" / "annotations.json").read_text())
    stripped = score_discriminative((x["type"], x["truth"], responses[x["id"]].strip())
                                    for x in annotations if x["type"] != "generative")
    assert metrics["benchmarks"]["amber"]["discriminative"] == stripped
    assert stripped["number"] != printed["Number"] and stripped["relation"] == printed["Relation"]
    n_objhal = len(texts)
    assert metrics["counts"]["objhal"] == {"items": n_objhal, "scored": n_objhal, "failed": 0, "skipped_at_load": 1}
    assert metrics["counts"]["amber"]["skipped_at_load"] == 6 and metrics["failures"]["amber"] == {"load_generative_without_relation": 6}
    lines = (tmp_path / "eval" / "m" / "items.jsonl").read_text().splitlines()
    skipped = (tmp_path / "eval" / "m" / "skipped.jsonl").read_text().splitlines()
    assert len(lines) + len(skipped) == n_objhal + 1 + len(queries)  # every input row accounted for
    report = (tmp_path / "eval" / "m" / "metrics.json").read_text()
    assert json.loads(report)["benchmarks"]["objhal"]["CHAIRs_refine"] == golden["CHAIRs_refine"]
