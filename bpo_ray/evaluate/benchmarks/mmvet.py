"""MM-Vet-style grading: the judge scores each answer 0.0-1.0 against the reference.

Yu et al., "MM-Vet: Evaluating Large Multimodal Models for Integrated Capabilities", 2023. The
grader prompt below follows MM-Vet's protocol (a few-shot table of graded rows, the item appended
as the last row, the judge filling in the score) in our own words and examples. Scores are only
comparable with published MM-Vet numbers under MM-Vet's own prompt: set
``evaluate.mmvet.grader_prompt_file`` to a file holding it. Kept from the protocol: the query layout (the row
``question | ground truth | prediction | `` appended after a blank line, ``<AND>``/``<OR>`` padded
with spaces), the re-ask suffix, temperature 0 for the first re-ask and +0.5 for each further one,
and the rule that a grade still unparsable after five attempts counts 0.0. Totals: per capability, the summed grades of
the items carrying it over their number, times 100 (a multi-capability item counts for each);
``total`` is the mean over all items, times 100.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence

from bpo_ray.config.evaluate import MMVetSettings
from bpo_ray.evaluate.items import EvalItem, LoadedBenchmark, row_meta
from bpo_ray.evaluate.judge import JudgeProtocol, JudgeRequest
from bpo_ray.evaluate.sources import first_human_turn, load_world_split, read_json
from bpo_ray.images import resolve_image_uri

NAME = "mmvet"
CAPABILITIES: tuple[str, ...] = ("rec", "ocr", "know", "gen", "spat", "math")

GRADER_PROMPT = """You grade answers of AI assistants. Given a question, its ground-truth answer and an assistant's prediction, give the prediction a correctness score. In the ground truth, <AND> joins elements that must all appear for the prediction to be fully right; <OR> joins alternatives, any one of which makes it fully right. Use one of 0.0 (entirely wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 (entirely right), partial credit for partly right answers. Fill in only the last cell, the score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
How many apples are on the plate? | 4 | There are four apples. | 1.0
How many apples are on the plate? | 4 | There are three apples. | 0.0
Which two colours does the flag have? | red <AND> white | The flag is red. | 0.5
Which two colours does the flag have? | red <AND> white | It is red and white. | 1.0
What animal could this be? | fox <OR> wolf | It looks like a wolf. | 1.0
Describe the scene. | A man rides a bicycle along a river at sunset, with a city skyline behind him. | Someone is cycling near water in the evening. | 0.6
Describe the scene. | A man rides a bicycle along a river at sunset, with a city skyline behind him. | A man on a bicycle rides beside a river at sunset; tall city buildings stand in the background. | 1.0
"""
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
GRADE_MAX_TOKENS = 3  # MM-Vet asks for at most 3 tokens: the grade alone

WORLD_CAPABILITIES: dict[str, list[str]] = {
    "colour": ["rec"],
    "count": ["rec", "math"],
    "existence": ["rec"],
    "position": ["rec", "spat"],
    "listing": ["rec"],
    "caption": ["rec", "gen"],
}
"""Bias-world question type -> MM-Vet capabilities (recognition everywhere; counting needs number
sense, positions spatial awareness, detailed captions language generation)."""


def grader_query(question: str, reference: str, prediction: str, attempt: int = 0,
                 prompt: Optional[str] = None) -> str:
    """The user message for one item (attempt > 0 adds the re-ask suffix); ``prompt`` replaces
    the built-in grader prompt (e.g. MM-Vet's official one, read from a file)."""
    reference = reference.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    query = (prompt or GRADER_PROMPT).rstrip("\n") + "\n\n" + " | ".join([question, reference, prediction, ""])
    return query + RETRY_SUFFIX if attempt > 0 else query


_NUMBER = re.compile(r"(?<![\w.])[-+]?(\d+(?:\.\d*)?|\.\d+)(%?)")


def parse_grade(text: str) -> Optional[float]:
    """The grade in [0, 1] from a judge reply, or ``None``.

    MM-Vet reads ``float(reply.split(" ")[0])``; this also takes "Correctness: 0.8", "0.8.",
    "**1.0**" and "80%", by reading the first number. A first number outside [0, 1] (e.g. "8")
    makes the reply unusable rather than being guessed at.
    """
    match = _NUMBER.search(text or "")
    if not match:
        return None
    value = float(match.group(1))
    if match.group(2) == "%":
        value /= 100.0
    if match.group(0).startswith("-") or not 0.0 <= value <= 1.0:
        return None
    return round(value, 4)


def grade_request(row: Mapping[str, Any], attempt: int, prompt: Optional[str] = None) -> JudgeRequest:
    query = grader_query(row["question"], row["reference"], row["answer"], attempt, prompt)
    # MM-Vet re-asks first at temperature 0, then raises it by 0.5 per further attempt.
    return JudgeRequest([{"role": "user", "content": query}], max_tokens=GRADE_MAX_TOKENS,
                        temperature=min(2.0, 0.5 * max(0, attempt - 1)))


def grader_protocol(attempts: int = 5, prompt: Optional[str] = None) -> JudgeProtocol:
    """The grading protocol; ``prompt`` (e.g. MM-Vet's official text) replaces ``GRADER_PROMPT``."""
    def build(row: Mapping[str, Any], attempt: int) -> JudgeRequest:
        return grade_request(row, attempt, prompt)

    return JudgeProtocol(build=build, parse=parse_grade, attempts=attempts, fallback=lambda: 0.0, name=NAME)


# ---------------------------------------------------------------------------------------------
# Loaders


def load_official(settings: MMVetSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """``mm-vet.json``: ``{"v1_0": {"imagename", "question", "answer", "capability": [...]}, ...}``."""
    data = read_json(settings.data)
    loaded = LoadedBenchmark(NAME, [], {"source": "mmvet"})
    if not isinstance(data, dict):
        loaded.skip("not_a_mapping", data)
        return loaded
    for key, record in data.items():
        if not isinstance(record, dict) or not all(record.get(k) for k in ("imagename", "question", "answer")):
            loaded.skip("bad_mmvet_record", {key: record})
            continue
        capabilities = sorted(set(record.get("capability") or []))
        if not capabilities:
            loaded.skip("no_capability", {key: record})
            continue
        loaded.items.append(EvalItem(
            f"{NAME}/{key}", NAME, resolve_image_uri(record["imagename"], settings.images), record["question"],
            reference=str(record["answer"]), category="_".join(capabilities), meta={"capabilities": capabilities}))
        if max_items and len(loaded.items) >= max_items:
            break
    return loaded


def world_question_type(question: str, source: str) -> str:
    q = question.lower()
    if source == "caption":
        return "caption"
    for prefix, kind in (("what colour", "colour"), ("how many", "count"), ("is there", "existence"),
                         ("where", "position"), ("what objects", "listing")):
        if q.startswith(prefix):
            return kind
    return "listing"


def load_world(world_dir: str, settings: MMVetSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """Single-turn VQA records and detailed captions of the test split; references = ground truth.

    Items alternate VQA and caption records so a ``max_items`` cut keeps both kinds.
    """
    split = load_world_split(world_dir, "test", require_sources={"vqa", "caption"})
    by_source: dict[str, list[dict]] = defaultdict(list)
    for record in sorted(split.records, key=lambda r: r["id"]):
        by_source[record["source"]].append(record)
    ordered = [r for pair in zip(by_source["vqa"], by_source["caption"]) for r in pair]
    ordered += by_source["vqa"][len(by_source["caption"]):] + by_source["caption"][len(by_source["vqa"]):]
    loaded = LoadedBenchmark(NAME, [], {"source": "world"})
    for record in ordered:
        question, answer = first_human_turn(record)
        if not question or not answer:
            loaded.skip("empty_turn", record)
            continue
        capabilities = WORLD_CAPABILITIES[world_question_type(question, record["source"])]
        loaded.items.append(EvalItem(f"{NAME}/{record['id']}", NAME, record["image"], question, reference=answer,
                                     category="_".join(capabilities), meta={"capabilities": capabilities}))
        if max_items and len(loaded.items) >= max_items:
            break
    return loaded


# ---------------------------------------------------------------------------------------------
# Scorer


def capability_totals(grades: Sequence[float], capability_sets: Sequence[Sequence[str]]) -> dict[str, Any]:
    """MM-Vet's table: per capability and per capability integration, 100 x mean grade."""
    if len(grades) != len(capability_sets):
        raise ValueError(f"{len(grades)} grades but {len(capability_sets)} capability sets")
    per_cap: dict[str, list[float]] = defaultdict(list)
    per_integration: dict[str, list[float]] = defaultdict(list)
    for grade, caps in zip(grades, capability_sets):
        for cap in set(caps):
            per_cap[cap].append(grade)
        per_integration["_".join(sorted(set(caps)))].append(grade)
    ordered = [c for c in CAPABILITIES if c in per_cap] + sorted(c for c in per_cap if c not in CAPABILITIES)
    return {
        "total": 100.0 * sum(grades) / len(grades) if grades else 0.0,
        "per_capability": {c: 100.0 * sum(per_cap[c]) / len(per_cap[c]) for c in ordered},
        "per_integration": {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_integration.items())},
        "n": len(grades),
        "n_per_capability": {c: len(per_cap[c]) for c in ordered},
    }


def score(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    grades = [float(json.loads(r["judge_value"])) for r in rows]
    caps = [row_meta(r)["capabilities"] for r in rows]
    metrics = capability_totals(grades, caps)
    metrics["n_unparsed_grades"] = sum(r.get("judge_error") == "unparsable" for r in rows)
    details = [{"id": r["id"], "grade": g, "capabilities": c, "judge_output": r.get("judge_output", "")}
               for r, g, c in zip(rows, grades, caps)]
    return metrics, details
