"""Li et al. 2024's text-ability benchmarks through the served model and the judge proxy.

- ``run_mtbench``: MT-Bench-style two-turn questions (``benchmarks.mtbench``), the model answering
  turn 2 with turn 1 in its history, each turn rated 1-10 by the judge; ``image_mode`` "blank" or
  "random" attaches a white or a seeded random-noise image to turn 1 (the paper's noisy-image
  MT-Bench), "none" sends text only.
- ``run_alpaca_eval``: the model answers every instruction of an AlpacaEval reference file; the
  judge compares its output with the reference output (``benchmarks.alpaca_eval``).
- ``answer_instructions``: a model's outputs written as an AlpacaEval reference file (how the bias
  world's miniature gets its reference: the base model's outputs).

Both endpoints are reached with the official ``openai`` client; the model answers greedily
(temperature 0, as Li et al. 2024 runs every benchmark). Requests run on a small thread pool; results are
in input order, so the same endpoints give the same numbers.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from bpo_ray import storage
from bpo_ray.evaluate.benchmarks import alpaca_eval, mtbench
from bpo_ray.evaluate.judge import Secret, error_reason, model_client
from bpo_ray.serving.judge.client import judge_client
from bpo_ray.generate.seeds import derive_seed
from bpo_ray.images import to_data_url

IMAGE_MODES = ("none", "blank", "random")


def noise_image(mode: str, seed: int, key: str, size: int = 32) -> Optional[Image.Image]:
    """The image attached to turn 1: none, white, or uniform noise seeded by (seed, key)."""
    if mode == "none":
        return None
    if mode == "blank":
        return Image.new("RGB", (size, size), (255, 255, 255))
    if mode == "random":
        rng = np.random.default_rng(derive_seed(seed, "noisy-image", key))
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {mode!r}")


class Endpoints:
    """The served model and the judge proxy, each behind the official ``openai`` client."""

    def __init__(self, model_url: str, model_name: str, judge_url: str, judge_token: Secret,
                 judge_model: str = "gpt-4", max_tokens: int = 64, timeout_s: float = 120.0, max_retries: int = 2,
                 judge_attempts: int = 2, extra_body: Optional[dict[str, Any]] = None):
        self.model = model_client(model_url, Secret("unused"), timeout_s, max_retries)
        self.judge = judge_client(judge_url, token=judge_token.get(), timeout_s=timeout_s, max_retries=max_retries)
        self.model_name, self.judge_model = model_name, judge_model
        self.max_tokens, self.judge_attempts = max_tokens, judge_attempts
        self.extra_body = extra_body  # e.g. {"steer_attributes": {...}} for a SteerLM model

    def answer(self, messages: list[dict[str, Any]]) -> str:
        reply = self.model.chat.completions.create(model=self.model_name, messages=messages, temperature=0,
                                                   max_tokens=self.max_tokens, seed=0, extra_body=self.extra_body)
        return (reply.choices[0].message.content or "") if reply.choices else ""

    def judge_value(self, prompt: str, parse: Callable[[str], Any]) -> tuple[Any, str]:
        """The parsed judge reply (``None`` after ``judge_attempts`` unusable replies) and its text."""
        text = ""
        for _ in range(self.judge_attempts):
            reply = self.judge.chat.completions.create(model=self.judge_model, temperature=0, seed=0, max_tokens=512,
                                                       messages=[{"role": "user", "content": prompt}])
            text = (reply.choices[0].message.content or "") if reply.choices else ""
            value = parse(text)
            if value is not None:
                return value, text
        return None, text


def _pool_map(fn, items: Sequence, workers: int) -> list:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(fn, items))


def run_mtbench(questions: Sequence[mtbench.Question], ep: Endpoints, image_mode: str = "none", seed: int = 0,
                workers: int = 4) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer and grade every question; returns (metrics, per-question details)."""
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")

    def one(q: mtbench.Question) -> dict[str, Any]:
        image = noise_image(image_mode, seed, q.question_id)
        first: Any = q.turns[0]
        if image is not None:
            first = [{"type": "image_url", "image_url": {"url": to_data_url(image)}}, {"type": "text", "text": q.turns[0]}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
        answers, ratings, judge_out, error = [], [], [], None
        try:
            for t, turn in enumerate(q.turns):
                if t:
                    messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": turn}]
                answers.append(ep.answer(messages))
            for t in range(len(q.turns)):
                rating, text = ep.judge_value(mtbench.judge_prompt(q, answers, t), mtbench.parse_rating)
                ratings.append(rating)
                judge_out.append(text)
        except Exception as exc:  # noqa: BLE001 - an endpoint failure is recorded per question, by reason
            error = error_reason(exc)
            ratings += [None] * (len(q.turns) - len(ratings))
        return {"question_id": q.question_id, "category": q.category, "answers": answers, "ratings": ratings,
                "judge_output": judge_out, "error": error}

    details = _pool_map(one, list(questions), workers)
    metrics = mtbench.score([d["ratings"] for d in details], [d["category"] for d in details])
    metrics["image_mode"] = image_mode
    metrics["n_errors"] = sum(d["error"] is not None for d in details)
    return metrics, details


def run_alpaca_eval(items: Sequence[alpaca_eval.ReferenceItem], ep: Endpoints, seed: int = 0,
                    workers: int = 4) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The model's win rate against the reference outputs; returns (metrics, per-item details)."""
    def one(item: alpaca_eval.ReferenceItem) -> dict[str, Any]:
        first = alpaca_eval.model_first(seed, item.index)
        try:
            output = ep.answer([{"role": "user", "content": item.instruction}])
            verdict, text = ep.judge_value(alpaca_eval.judge_prompt(item.instruction, output, item.output, first),
                                           alpaca_eval.parse_verdict)
        except Exception as exc:  # noqa: BLE001 - recorded per item, by reason
            return {"index": item.index, "preference": None, "error": error_reason(exc)}
        pref = alpaca_eval.model_preference(verdict, first) if verdict is not None else None
        return {"index": item.index, "output": output, "model_first": first, "verdict": verdict,
                "preference": pref, "judge_output": text, "error": None}

    details = _pool_map(one, list(items), workers)
    metrics = alpaca_eval.score([d["preference"] for d in details])
    metrics["n_errors"] = sum(d["error"] is not None for d in details)
    return metrics, details


def answer_instructions(instructions: Sequence[str], ep: Endpoints, generator: str, out_uri: str,
                        dataset: str = "bias-world", workers: int = 4) -> list[dict[str, Any]]:
    """The model's outputs for ``instructions`` as an AlpacaEval reference file at ``out_uri``."""
    outputs = _pool_map(lambda q: ep.answer([{"role": "user", "content": q}]), list(instructions), workers)
    records = [{"instruction": q, "output": o, "generator": generator, "dataset": dataset}
               for q, o in zip(instructions, outputs)]
    storage.write_text(out_uri, json.dumps(records, indent=1))
    return records
