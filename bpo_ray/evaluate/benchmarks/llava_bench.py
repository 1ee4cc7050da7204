"""LLaVA-Bench-style review: the judge rates the reference and the candidate answer 1-10.

Liu et al., "Visual Instruction Tuning" (LLaVA), 2023, LLaVA-Bench (COCO / In-the-Wild). The review
follows the protocol of LLaVA's GPT-4 review (its wording is ours; see ``RULE_PROMPT``):
system message, the ``[Context]/[Question]/[Assistant 1]/[Assistant 2]/[System]`` layout with the
reference as Assistant 1 and the candidate as Assistant 2, the ``llava_bench_<category>`` rule
prompt, temperature 0.2, and "score1 score2" read from the reply's first line. The relative score
of a category is mean(candidate) / mean(reference) x 100, as in ``summarize_gpt_review.py``.
Unlike the original (which averages a parse failure in as -1, -1), an unparsable review is
re-asked once and then counted as a judge failure, outside the means.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence

from bpo_ray.config.evaluate import LlavaBenchSettings
from bpo_ray.evaluate.items import EvalItem, LoadedBenchmark, row_meta
from bpo_ray.evaluate.judge import JudgeProtocol, JudgeRequest
from bpo_ray.evaluate.sources import first_human_turn, load_world_split, read_records
from bpo_ray.images import resolve_image_uri

NAME = "llava_bench"
CATEGORIES: tuple[str, ...] = ("conv", "detail", "complex")
SYSTEM_PROMPT = "You are a careful, impartial assistant who checks the quality of answers."
ROLE = "Assistant"
RULE_PROMPT = (
    "Please judge how well two AI assistants answered the user question shown above. The user asked it while "
    "looking at an image; since you cannot see the image, a few sentences describing it are given as context.\n"
    "Rate each answer for helpfulness, relevance, accuracy and level of detail with one overall score from 1 to 10 "
    "(higher is better).\n"
    "On the first line output only the two scores, for Assistant 1 and Assistant 2 in that order, separated by a "
    "space.\n"
    "From the next line on, explain your ratings. Be impartial: the order in which the answers appear must not "
    "influence your judgement."
)
"""Our wording of LLaVA's review rule (same request: two 1-10 scores on the first line, then the
reasoning). For numbers comparable with published LLaVA-Bench results, set
``evaluate.llava_bench.rule_prompt_file`` to a file holding LLaVA's own rule text."""
REVIEW_TEMPERATURE = 0.2
REVIEW_MAX_TOKENS = 1024


def review_content(context: str, question: str, reference: str, candidate: str, rule: Optional[str] = None) -> str:
    """The user message of one review (LLaVA's layout); ``rule`` replaces ``RULE_PROMPT``."""
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n"
            f"[{ROLE} 2]\n{candidate}\n\n[End of {ROLE} 2]\n\n"
            f"[System]\n{rule or RULE_PROMPT}\n\n")


_ASSISTANT_LABEL = re.compile(r"assistant\s*[12]\s*[:=\-]?", re.I)
_SCORE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w|\.\d)")


def parse_score_pair(text: str) -> Optional[list[float]]:
    """``[reference score, candidate score]`` from a review, or ``None``.

    LLaVA splits the first line on spaces (commas made spaces) and wants exactly two numbers. This
    reads the first non-empty line, drops "Assistant 1:"-style labels and "/10" suffixes, and
    wants exactly two numbers in [0, 10] there: "8 6", "8, 6", "(8, 6)", "Assistant 1: 8
    Assistant 2: 6", "8/10 6/10" all parse; a line with a third number does not.
    """
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        cleaned = _ASSISTANT_LABEL.sub(" ", line)
        cleaned = re.sub(r"/\s*10\b", " ", cleaned)
        numbers = [float(n) for n in _SCORE.findall(cleaned)]
        if len(numbers) == 2 and all(0.0 <= n <= 10.0 for n in numbers):
            return numbers
        return None
    return None


def review_request(row: Mapping[str, Any], attempt: int, rule: Optional[str] = None) -> JudgeRequest:
    meta = row_meta(row)
    content = review_content(meta.get("context", ""), row["question"], row["reference"], row["answer"], rule)
    return JudgeRequest([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
                        max_tokens=REVIEW_MAX_TOKENS, temperature=REVIEW_TEMPERATURE)


def reviewer(rule: Optional[str] = None) -> JudgeProtocol:
    """The review protocol; ``rule`` (e.g. LLaVA's own rule text) replaces ``RULE_PROMPT``."""
    def build(row: Mapping[str, Any], attempt: int) -> JudgeRequest:
        return review_request(row, attempt, rule)

    return JudgeProtocol(build=build, parse=parse_score_pair, attempts=2, name=NAME)


REVIEWER = reviewer()


# ---------------------------------------------------------------------------------------------
# Loaders


def _context_text(caption: Any) -> str:
    return "\n".join(caption) if isinstance(caption, list) else str(caption or "")


def load_official(settings: LlavaBenchSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """LLaVA-Bench files: questions.jsonl ``{question_id, image, text, category}``, the reference
    answers jsonl ``{question_id, text}`` (GPT-4's, in the release) and context.jsonl
    ``{image, caption}`` (a string or a list of sentences)."""
    loaded = LoadedBenchmark(NAME, [], {"source": "llava_bench"})
    questions, bad_q = read_records(settings.questions)
    answers, bad_a = read_records(settings.answers)
    contexts, bad_c = read_records(settings.context)
    for line in bad_q + bad_a + bad_c:
        loaded.skip("bad_json", line)
    reference = {a.get("question_id"): a.get("text", "") for a in answers}
    context = {c.get("image"): _context_text(c.get("caption")) for c in contexts}
    for q in questions:
        qid = q.get("question_id")
        if qid not in reference:
            loaded.skip("no_reference_answer", q)
            continue
        if not q.get("image") or not q.get("text"):
            loaded.skip("bad_question_record", q)
            continue
        if q["image"] not in context:
            loaded.skip("no_context", q)
            continue
        category = str(q.get("category") or "conv")
        loaded.items.append(EvalItem(f"{NAME}/{qid}", NAME, resolve_image_uri(q["image"], settings.images), q["text"],
                                     reference=reference[qid], category=category, meta={"context": context[q["image"]]}))
        if max_items and len(loaded.items) >= max_items:
            break
    return loaded


def load_world(world_dir: str, settings: LlavaBenchSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """Bias-world items: short questions ("conv"), detailed captions ("detail") and multi-turn
    records' listing questions ("complex"); context = the scene's ground-truth caption; reference
    answers = ground truth. Categories alternate so a ``max_items`` cut keeps all three."""
    split = load_world_split(world_dir, "test")
    captions = {r["image"]: first_human_turn(r)[1] for r in split.records if r.get("source") == "caption"}
    by_category: dict[str, list[EvalItem]] = defaultdict(list)
    loaded = LoadedBenchmark(NAME, [], {"source": "world"})
    for record in sorted(split.records, key=lambda r: r["id"]):
        if record["image"] not in captions:
            loaded.skip("no_context", record)
            continue
        question, answer = first_human_turn(record)
        category = {"vqa": "conv", "caption": "detail", "conversation": "complex"}.get(record.get("source", ""), "conv")
        by_category[category].append(EvalItem(
            f"{NAME}/{record['id']}", NAME, record["image"], question, reference=answer, category=category,
            meta={"context": captions[record["image"]]}))
    queues = [list(by_category[c]) for c in CATEGORIES]
    while any(queues) and not (max_items and len(loaded.items) >= max_items):
        for queue in queues:
            if queue and not (max_items and len(loaded.items) >= max_items):
                loaded.items.append(queue.pop(0))
    return loaded


# ---------------------------------------------------------------------------------------------
# Scorer


def relative_scores(pairs: Sequence[Sequence[float]], categories: Sequence[str]) -> dict[str, Any]:
    """Per category and overall ("all"): 100 x mean(candidate) / mean(reference), plus both means."""
    if len(pairs) != len(categories):
        raise ValueError(f"{len(pairs)} score pairs but {len(categories)} categories")
    grouped: dict[str, list[Sequence[float]]] = defaultdict(list)
    for pair, category in zip(pairs, categories):
        grouped[category].append(pair)
        grouped["all"].append(pair)

    def summary(values: list[Sequence[float]]) -> dict[str, float]:
        ref = sum(v[0] for v in values) / len(values)
        cand = sum(v[1] for v in values) / len(values)
        return {"relative": 100.0 * cand / ref if ref else 0.0, "reference_mean": ref, "candidate_mean": cand,
                "n": len(values)}

    ordered = [c for c in CATEGORIES if c in grouped] + sorted(c for c in grouped if c not in CATEGORIES and c != "all")
    out = {"all": summary(grouped["all"]) if pairs else {"relative": 0.0, "reference_mean": 0.0,
                                                           "candidate_mean": 0.0, "n": 0}}
    out["per_category"] = {c: summary(grouped[c]) for c in ordered}
    return out


def score(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    pairs = [json.loads(r["judge_value"]) for r in rows]
    categories = [r["category"] for r in rows]
    metrics = relative_scores(pairs, categories)
    details = [{"id": r["id"], "category": c, "reference_score": p[0], "candidate_score": p[1]}
               for r, p, c in zip(rows, pairs, categories)]
    return metrics, details
