"""MT-Bench-style single-answer grading of multi-turn text questions (Li et al. 2024's text benchmark).

Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", 2023 (FastChat's
``llm_judge``). Kept from the protocol: the question file format (``question.jsonl``: one object a
line, ``question_id``, ``category``, ``turns`` [2 user turns], optional ``reference`` [one answer
per turn]); the model answers turn 1, then turn 2 with turn 1 in its history; the judge rates each
turn 1-10 and writes the rating as ``[[N]]`` (``parse_rating`` reads it as FastChat does: the
``[[N]]`` pattern, else ``[N]``); turn 1 is graded alone, turn 2 with the whole conversation in
view; a reference answer is shown to the judge when the question has one; the score is the mean
over all graded turns (and per turn). Our prompts say the same in our own words, so scores are not
comparable with published MT-Bench numbers.

Li et al. 2024's noisy-image variant asks the same questions with a blank or a random image attached to
the first turn (``image_mode``), to see whether the MLLM's text ability survives an image.

The bias world's miniature (``world_questions``) is *not* MT-Bench: two-turn reading questions
about a scene described in words, in the format of the world's text corpus (a caption, then a
question about it), whose answers the world's annotator grades from that caption.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from bpo_ray import storage
from bpo_ray.evaluate.items import SkipTally

NAME = "mtbench"
RATING_MIN, RATING_MAX = 1, 10

SINGLE_TEMPLATE = """[Instruction]
You are a fair and careful judge. Rate how good the AI assistant's answer to the user's question below is: consider helpfulness, relevance, accuracy, depth and level of detail.{ref_rule} First explain your judgement briefly and objectively, then give a rating from 1 to 10 written exactly as "[[rating]]", for example "Rating: [[5]]".

[Question]
{question}
{reference}
[The Start of Assistant's Answer]
{answer}
[The End of Assistant's Answer]"""

MULTI_TEMPLATE = """[Instruction]
You are a fair and careful judge. Below is a conversation between a user and an AI assistant. Rate only the assistant's answer to the user's second question: consider helpfulness, relevance, accuracy, depth and level of detail.{ref_rule} First explain your judgement briefly and objectively, then give a rating from 1 to 10 written exactly as "[[rating]]", for example "Rating: [[5]]".

<|The Start of Assistant A's Conversation with User|>

### User:
{q1}

### Assistant A:
{a1}

### User:
{q2}

### Assistant A:
{a2}

<|The End of Assistant A's Conversation with User|>
{reference}"""

REF_RULE = " Compare the answer with the reference answer; mistakes against it weigh heavily."


class QuestionFileError(ValueError):
    """The question file cannot be read at all (missing, not JSON lines)."""


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()


@dataclass
class LoadedQuestions(SkipTally):
    questions: list[Question] = field(default_factory=list)


def parse_question(record: Any) -> Question:
    """One ``question.jsonl`` record, or ``ValueError`` naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not_an_object")
    qid = record.get("question_id")
    if qid is None or isinstance(qid, bool) or not isinstance(qid, (int, str)) or str(qid) == "":
        raise ValueError("missing_question_id")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or len(turns) > 2 or \
            not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError("bad_turns")
    reference = record.get("reference") or []
    if not isinstance(reference, list) or not all(isinstance(r, str) for r in reference) \
            or (reference and len(reference) != len(turns)):
        raise ValueError("bad_reference")
    return Question(str(qid), str(record.get("category") or "general"), tuple(turns), tuple(reference))


def load_questions(uri: str, max_items: Optional[int] = None) -> LoadedQuestions:
    """``question.jsonl`` from a local path or ``s3://``; bad lines are skipped and counted by
    reason (``malformed_json``, ``not_an_object``, ``missing_question_id``, ``bad_turns``,
    ``bad_reference``, ``duplicate_question_id``)."""
    if not storage.exists(uri):
        raise QuestionFileError(f"no MT-Bench question file at {uri}")
    loaded = LoadedQuestions()
    seen: set[str] = set()
    for line in storage.iter_lines(uri):
        if not line.strip():
            continue
        try:
            q = parse_question(json.loads(line))
        except json.JSONDecodeError:
            loaded.skip("malformed_json")
            continue
        except ValueError as exc:
            loaded.skip(str(exc))
            continue
        if q.question_id in seen:
            loaded.skip("duplicate_question_id")
            continue
        seen.add(q.question_id)
        loaded.questions.append(q)
        if max_items and len(loaded.questions) >= max_items:
            break
    return loaded


def _reference_block(reference: Optional[str]) -> tuple[str, str]:
    if not reference:
        return "", ""
    return REF_RULE, f"\n[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n"


def judge_prompt(question: Question, answers: Sequence[str], turn: int) -> str:
    """The judge's user message for ``turn`` (0 or 1) of ``question`` answered with ``answers``."""
    reference = question.reference[turn] if question.reference else None
    rule, block = _reference_block(reference)
    if turn == 0:
        return SINGLE_TEMPLATE.format(ref_rule=rule, question=question.turns[0], reference=block, answer=answers[0])
    return MULTI_TEMPLATE.format(ref_rule=rule, q1=question.turns[0], a1=answers[0], q2=question.turns[1],
                                 a2=answers[1], reference=block)


_DOUBLE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SINGLE = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str) -> Optional[float]:
    """The rating of a judge reply: the first ``[[N]]`` (else ``[N]``), 1-10; ``None`` if absent
    or out of range (FastChat records -1 there; we retry and then count the turn as unparsed)."""
    for pattern in (_DOUBLE, _SINGLE):
        match = pattern.search(text or "")
        if match:
            value = float(match.group(1))
            return value if RATING_MIN <= value <= RATING_MAX else None
    return None


def score(ratings: Sequence[Sequence[Optional[float]]], categories: Sequence[str]) -> dict[str, Any]:
    """MT-Bench's summary: mean rating over graded turns, per turn and per category; unparsed
    turns (``None``) are left out of the means and counted."""
    per_turn: dict[int, list[float]] = {}
    per_cat: dict[str, list[float]] = {}
    all_: list[float] = []
    unparsed = 0
    for turns, cat in zip(ratings, categories):
        for t, r in enumerate(turns):
            if r is None:
                unparsed += 1
                continue
            per_turn.setdefault(t + 1, []).append(r)
            per_cat.setdefault(cat, []).append(r)
            all_.append(r)
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)
    return {"score": mean(all_), "per_turn": {f"turn{t}": mean(v) for t, v in sorted(per_turn.items())},
            "per_category": {c: mean(v) for c, v in sorted(per_cat.items())},
            "n_questions": len(ratings), "n_turns_graded": len(all_), "n_unparsed": unparsed}


# ---------------------------------------------------------------------------------------------
# The bias world's miniature


def world_questions(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` two-turn reading questions in ``question.jsonl`` format, deterministic in ``seed``.

    Turn 1: the caption of a scene (``bpo_ray.world.scenes``, kinds drawn independently of the
    world's prior pairs) followed by an existence question, as the world's reading corpus phrases
    it; turn 2: a colour, count or existence question about the same scene. References are the
    world's own answers. The category names turn 2's question type.
    """
    from bpo_ray.world import scenes

    rng = random.Random(f"bpo-ray-mtbench-world:{seed}")
    out = []
    for i in range(n):
        scene = scenes.sample_scene(rng, f"mtbench-{i}")
        while not scene.objects:
            scene = scenes.sample_scene(rng, f"mtbench-{i}")
        q1, a1 = scenes.existence_question(scene, rng)
        kind = rng.choice(("colour", "count", "existence"))
        q2, a2 = scenes.SHORT_QUESTIONS[kind](scene, rng)
        out.append({"question_id": i + 1, "category": kind, "turns": [f"{scenes.describe_scene(scene)} {q1}", q2],
                    "reference": [a1, a2]})
    return out


def write_questions(records: Sequence[dict[str, Any]], uri: str) -> None:
    storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in records))
