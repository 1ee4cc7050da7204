"""Li et al. 2024's "SFT from Gemini responses" baseline (section 3.2): the judge answers each question
itself, with the image, and the model is fine-tuned on those answers (``train.mode=sft``).

The items are those of the annotation dataset (one per ``source_id``: its image, LLaVA prompt and
question), so the baseline sees exactly the prompts the other methods were trained on. The judge
is any OpenAI-compatible endpoint (the judge proxy; in the bias world, the world's annotator,
which answers from the scene). Every item ends as one SFT row or one quarantine row with its reason
(``judge_error`` after the client's transport retries, ``empty_answer``, or the image's reason:
``missing_image``, ``corrupt_image``, ...).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from bpo_ray.images import ImageError, load_image, to_data_url
from bpo_ray.schemas import pair_id, pairs_table, quarantine_table
from bpo_ray.world.annotator import DIRECT_ANSWER_TEMPLATE

STRATEGY = "judge_answer"


@dataclass
class JudgeAnswers:
    """SFT rows (``PAIR_SCHEMA``, ``rejected`` = ``chosen``, unused in SFT) and quarantine rows."""

    rows: pa.Table
    quarantine: pa.Table
    counts: dict[str, int] = field(default_factory=dict)


def direct_answer_messages(question: str, image_data_url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url}},
                                         {"type": "text", "text": DIRECT_ANSWER_TEMPLATE.format(question=question)}]}]


def _items(annotations: pa.Table) -> list[dict[str, Any]]:
    first: dict[str, dict[str, Any]] = {}
    for row in annotations.select(["source", "source_id", "image", "image_sha256", "prompt", "question"]).to_pylist():
        first.setdefault(row["source_id"], row)
    return [first[k] for k in sorted(first)]


def judge_answer_rows(annotations: pa.Table, base_url: str, model: str, token_env: str = "BPO_JUDGE_TOKEN",
                      timeout_s: float = 60.0, max_retries: int = 3, workers: int = 8) -> JudgeAnswers:
    """Ask the judge (temperature 0) to answer every annotated item's question; one row per item.
    The project's one judge client: the judge proxy's token from ``$token_env``, never logged."""
    from openai import OpenAIError

    from bpo_ray.serving.judge.client import judge_client

    client = judge_client(base_url, token_env=token_env, timeout_s=timeout_s, max_retries=max_retries)
    sampling = json.dumps({"judge_model": model, "temperature": 0.0, "prompt": "direct_answer"}, sort_keys=True)

    def one(item: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        try:
            image, _ = load_image(item["image"])
        except ImageError as exc:
            return item, f"{exc.reason}: {exc}"
        try:
            reply = client.chat.completions.create(
                model=model, temperature=0, messages=direct_answer_messages(item["question"], to_data_url(image)))
        except OpenAIError as exc:
            return item, f"judge_error: {type(exc).__name__}"
        text = (reply.choices[0].message.content or "").strip() if reply.choices else ""
        return ({**item, "answer": text}, None) if text else (item, "empty_answer")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, _items(annotations)))
    rows, quarantine = [], []
    for item, failure in results:
        if failure:
            quarantine.append({"source_id": item["source_id"], "stage": STRATEGY, "reason": failure.split(":")[0],
                               "raw": json.dumps({"question": item["question"], "image": item["image"],
                                                  "detail": failure})})
            continue
        params = {"noise_step": None, "generator": model, "sampling": sampling, "seed": 0}
        rows.append({"id": pair_id(item["source_id"], STRATEGY, params), "source": item["source"],
                     "source_id": item["source_id"], "image": item["image"], "image_sha256": item["image_sha256"],
                     "prompt": item["prompt"], "chosen": item["answer"], "rejected": item["answer"],
                     "strategy": STRATEGY, "noise_step": None, "generator": model, "sampling": sampling, "seed": 0})
    counts = {"items_in": len(results), "rows": len(rows), "quarantined": len(quarantine)}
    for q in quarantine:
        counts[f"quarantine.{q['reason']}"] = counts.get(f"quarantine.{q['reason']}", 0) + 1
    return JudgeAnswers(pairs_table(rows), quarantine_table(quarantine), counts)
