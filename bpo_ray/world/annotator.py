"""The bias world's annotator: answers every judge prompt bpo-ray sends, from the scene's truth.

Behind the judge proxy it takes GPT-4's place (``bpo_ray.world.judge_server`` serves it over an
OpenAI-compatible HTTP API). It is an annotator who sees the scene, not a model: each prompt is
recognised by its layout, the scene comes from the image (content hash -> scene, built from the
world directory) or, for text-only prompts, from the ground truth the prompt carries, and the
grade follows the written rules of ``bpo_ray.world.grading`` (docs/world.md). Prompts it knows:

- MM-Vet grading (``bpo_ray.evaluate.benchmarks.mmvet``; also MM-Vet's official prompt): the last
  ``question | ground truth | prediction |`` row -> a grade "0.0"-"1.0".
- LLaVA-Bench review (``[Context]/[Question]/[Assistant 1]/[Assistant 2]``): the context is the
  scene's ground-truth caption -> "score1 score2" and a reason.
- MMHal-Bench (the official template's ``### Image Contents`` ... ``### LMM Response to
  Evaluate`` sections) -> an explanation and "Rating: N", N in 0-6.
- HelpSteer ratings of the ``judge_ranked`` generate strategy (``[Question]``, ``[Reference
  answer]``, ``[Response i]``) -> reasons and the ``{"scores": [...]}`` JSON line; when the prompt
  lists ``- complexity:`` and ``- verbosity:`` (Li et al. 2024's annotation prompt) each entry carries
  all five attributes and its ``reasoning``.
- Claim verification (issue #16): the item's image plus exactly ``CLAIM_TEMPLATE`` -> "Yes." / "No.".
- Direct answers (Li et al. 2024's judge-answer SFT): the item's image plus ``DIRECT_ANSWER_TEMPLATE``
  -> the annotator's own answer in the world's style (``grading.true_answer``).
- MT-Bench single-answer grading (``bpo_ray.evaluate.benchmarks.mtbench``; turn 1 alone, turn 2
  in the conversation) of the world's text questions (a caption, then a question about it) ->
  an explanation and "Rating: [[N]]", N in 1-10 (``grading.mtbench_rating``).
- AlpacaEval pairwise comparison (``bpo_ray.evaluate.benchmarks.alpaca_eval``) of two outputs for a
  world text instruction -> "Output (a)", "Output (b)" or "Tie" (``grading.pairwise_key``).
- CHAIR's object lists (``evaluate.chair.extractor: judge``): the objects a description says are
  present -> "cup, dog" or "none" (the description is the whole input; no scene needed).

Anything else is refused (``UnknownPrompt``), so a new prompt is never graded by accident.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

from bpo_ray.world import grading
from bpo_ray.world.grading import SceneTruth

CLAIM_TEMPLATE = "Is there {article} {obj} in the image? Answer yes or no."
"""The claim-verification question (issue #16's divide-and-conquer verifier sends it verbatim with
the item's image as a ``data:`` URL); the annotator answers "Yes." or "No." from the scene."""

ANNOTATOR_MODEL = "bias-world-annotator"

DIRECT_ANSWER_TEMPLATE = ("Answer the question about the image yourself, as a helpful assistant would.\n\n"
                          "[Question]\n{question}\n[End of question]")
"""Li et al. 2024's "SFT on Gemini's answers" baseline asks the judge to answer the question directly
(``bpo_ray.generate.judge_answers`` sends it with the item's image); the annotator answers from the
scene in the world's answer style (``grading.true_answer``)."""
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "

_DIRECT_ANSWER = re.compile(r"Answer the question about the image yourself, as a helpful assistant would\.\n\n"
                            r"\[Question\]\n(?P<question>.*)\n\[End of question\]", re.S)
_CLAIM = re.compile(r"Is there (?:a|an) (?P<obj>.+?) in the image\? Answer yes or no\.")
_MMVET_HEADER = re.compile(r"\|\s*Ground truth\s*\|\s*Prediction\s*\|\s*Correctness", re.I)
_LLAVA = re.compile(r"\[Context\]\n(?P<context>.*?)\n\n\[Question\]\n(?P<question>.*?)\n\n"
                    r"\[(?P<role>[^\]\n]+) 1\]\n(?P<first>.*?)\n\n\[End of (?P=role) 1\]\n\n"
                    r"\[(?P=role) 2\]\n(?P<second>.*?)\n\n\[End of (?P=role) 2\]", re.S)
_MMHAL = re.compile(r"### Image Contents\n(?P<contents>.*?)\n\n### Question\n(?P<question>.*?)\n\n"
                    r"### Standard Human-Generated Answer\n(?P<reference>.*?)\n\n"
                    r"### LMM Response to Evaluate\n(?P<answer>.*?)\s*$", re.S)
_OBJECT_LIST = re.compile(r"List every physical object that the description says IS present.*?"
                          r"\nDescription:\n(?P<description>.*)\n\nObjects:\s*$", re.S)
_HELPSTEER_Q = re.compile(r"\[Question\]\n(?P<question>.*?)\n\[End of question\]", re.S)
_HELPSTEER_REF = re.compile(r"\[Reference answer\]\n(?P<reference>.*?)\n\[End of reference answer\]", re.S)
_MT_SINGLE = re.compile(r"\[Question\]\n(?P<question>.*?)\n\n(?:\[The Start of Reference Answer\]\n(?P<ref>.*?)\n"
                        r"\[The End of Reference Answer\]\n\n)?\[The Start of Assistant's Answer\]\n(?P<answer>.*?)\n"
                        r"\[The End of Assistant's Answer\]", re.S)
_MT_MULTI = re.compile(r"### User:\n(?P<q1>.*?)\n\n### Assistant A:\n(?P<a1>.*?)\n\n### User:\n(?P<q2>.*?)\n\n"
                       r"### Assistant A:\n(?P<a2>.*?)\n\n<\|The End of Assistant A's Conversation with User\|>", re.S)
_ALPACA = re.compile(r"## Instruction\n(?P<instruction>.*?)\n\n## Output \(a\)\n(?P<a>.*?)\n\n"
                     r"## Output \(b\)\n(?P<b>.*?)\n\n## Verdict", re.S)
_FIVE_ATTRIBUTES = re.compile(r"^- complexity:.*^- verbosity:", re.S | re.M)
_HELPSTEER_RESP = re.compile(r"\[Response (?P<i>\d+)\]\n(?P<text>.*?)\n\[End of Response (?P=i)\]", re.S)


class UnknownPrompt(ValueError):
    """The prompt is none of the protocols the annotator knows."""


class UnknownImage(ValueError):
    """A prompt needs the scene of an image that is not in the world."""


@dataclass(frozen=True)
class Reply:
    text: str
    protocol: str  # mmvet | llava_bench | mmhal | helpsteer | claim | chair | answer | mtbench | alpaca_eval


def answer_prompt(text: str, scene_of_image: Optional[Callable[[], Optional[SceneTruth]]] = None) -> Reply:
    """The annotator's reply to one judge prompt (the user message's text).

    ``scene_of_image`` returns the scene of the image the request carried (``None``: the request had
    no image); it raises ``UnknownImage`` when the image is not one of the world's. It is called only
    for the prompts graded against the image (claims, HelpSteer ratings).
    """
    def scene_or_none() -> Optional[SceneTruth]:
        return scene_of_image() if scene_of_image else None

    claim = _CLAIM.fullmatch(text.strip())
    if claim:
        scene = scene_or_none()
        if scene is None:
            raise UnknownPrompt("a claim-verification prompt needs the item's image (an image_url part)")
        kind = grading.asked_kind(claim["obj"])
        return Reply("Yes." if kind is not None and kind in scene else "No.", "claim")
    direct = _DIRECT_ANSWER.fullmatch(text.strip())
    if direct:
        scene = scene_or_none()
        if scene is None:
            raise UnknownPrompt("a direct-answer prompt needs the item's image (an image_url part)")
        return Reply(grading.true_answer(direct["question"].strip(), scene), "answer")
    match = _MT_MULTI.search(text)
    if match:
        return Reply(_mtbench(match["q1"], match["q2"], match["a2"]), "mtbench")
    match = _MT_SINGLE.search(text)
    if match:
        return Reply(_mtbench(match["question"], None, match["answer"]), "mtbench")
    match = _ALPACA.search(text)
    if match:
        return Reply(_alpaca(match["instruction"], match["a"], match["b"]), "alpaca_eval")
    match = _OBJECT_LIST.search(text)
    if match:
        kinds = sorted(grading.kinds_in(match["description"]))
        return Reply(", ".join(kinds) if kinds else "none", "chair")
    match = _MMHAL.search(text)
    if match:
        return Reply(_mmhal(match), "mmhal")
    match = _LLAVA.search(text)
    if match:
        return Reply(_llava(match), "llava_bench")
    if _HELPSTEER_REF.search(text) and _HELPSTEER_RESP.search(text):
        return Reply(_helpsteer(text, scene_or_none()), "helpsteer")
    if _MMVET_HEADER.search(text):
        return Reply(_mmvet(text), "mmvet")
    raise UnknownPrompt("not a judge prompt the world's annotator knows (MM-Vet, LLaVA-Bench, MMHal-Bench, "
                        "HelpSteer ratings, claim verification, direct answers, MT-Bench, AlpacaEval, "
                        "CHAIR object lists)")


def _mmvet(text: str) -> str:
    body = text[:-len(MMVET_RETRY_SUFFIX)] if text.endswith(MMVET_RETRY_SUFFIX) else text
    row = next((line for line in reversed(body.splitlines()) if line.strip()), "").rstrip()
    if row.endswith("|"):
        row = row[:-1].rstrip()
    parts = row.split(" | ", 2)
    if len(parts) != 3:
        raise UnknownPrompt("MM-Vet prompt without a final 'question | ground truth | prediction |' row")
    question, reference, prediction = (p.strip() for p in parts)
    reference = re.sub(r"\s*<(AND|OR)>\s*", " ", reference)
    grade = grading.grade_answer(grading.expected_from_reference(question, reference), prediction)
    return f"{grading.mmvet_grade(grade):.1f}"


def _llava(match: re.Match) -> str:
    question, context = match["question"].strip(), match["context"]
    scene = grading.scene_from_caption(context.strip())
    if scene is not None:
        expected, kinds = grading.expected_from_scene(question, scene), frozenset(scene)
    else:  # a context outside the world's grammar: the first answer is the reference
        expected, kinds = grading.expected_from_reference(question, match["first"]), None
    grades = [grading.grade_answer(expected, match[k].strip(), kinds) for k in ("first", "second")]
    s1, s2 = (grading.llava_score(g) for g in grades)
    return (f"{s1} {s2}\nAssistant 1: {grading.explain(grades[0])} "
            f"Assistant 2: {grading.explain(grades[1])}")


def _mmhal(match: re.Match) -> str:
    contents = match["contents"]
    kinds = grading.kinds_in(contents)
    question, reference, answer = match["question"].strip(), match["reference"].strip(), match["answer"].strip()
    grade = grading.grade_answer(grading.expected_from_reference(question, reference), answer, kinds)
    rating = grading.mmhal_rating(grade)
    verdict = "contains hallucination" if grade.hallucination else "contains no hallucination"
    return f"Explanation: {grading.explain(grade)} It {verdict}.\nRating: {rating}"


def _helpsteer(text: str, scene: Optional[SceneTruth]) -> str:
    q = _HELPSTEER_Q.search(text)
    ref = _HELPSTEER_REF.search(text)
    question = q["question"].strip() if q else ""
    reference = ref["reference"].strip() if ref else ""
    five = bool(_FIVE_ATTRIBUTES.search(text))  # the five-attribute prompt of Li et al. 2024's annotation job
    responses = [m["text"] for m in sorted(_HELPSTEER_RESP.finditer(text), key=lambda m: int(m["i"]))]
    if scene is not None:
        expected, kinds = grading.expected_from_scene(question, scene), frozenset(scene)
    else:
        expected, kinds = grading.expected_from_reference(question, reference), None
    scores = []
    reasons = []
    for i, response in enumerate(responses, 1):
        grade = grading.grade_answer(expected, response.strip(), kinds)
        why = grading.explain(grade)
        if five:
            ratings = grading.helpsteer_ratings(grade, response, reference)
            why += (f" It is {grading.word_count(response)} words against the reference's "
                    f"{grading.word_count(reference)}.")
            scores.append({"reasoning": why, **ratings})
        else:
            scores.append(grading.helpsteer_scores(grade, response))
        reasons.append(f"Response {i}: {why}")
    return "\n".join(reasons) + "\n" + json.dumps({"scores": scores})


def _text_scene(first_turn: str) -> tuple[SceneTruth, str]:
    """The scene a world text question describes (its caption) and the question after it."""
    caption, question = grading.split_text_question(first_turn)
    scene = grading.scene_from_caption(caption) if caption else None
    if scene is None:
        raise UnknownPrompt("a text question the annotator grades starts with a caption in the world's grammar")
    return scene, question


def _mtbench(first_turn: str, second_turn: Optional[str], answer: str) -> str:
    scene, question = _text_scene(first_turn.strip())
    if second_turn is not None:
        question = second_turn.strip()
    grade = grading.grade_answer(grading.expected_from_scene(question, scene), answer.strip(), frozenset(scene))
    rating = grading.mtbench_rating(grade, answer)
    return f"{grading.explain(grade)}\nRating: [[{rating}]]"


def _alpaca(instruction: str, first: str, second: str) -> str:
    scene, question = _text_scene(instruction.strip())
    expected = grading.expected_from_scene(question, scene)
    keys = [grading.pairwise_key(grading.grade_answer(expected, out.strip(), frozenset(scene)), out)
            for out in (first, second)]
    verdict = "Tie" if keys[0] == keys[1] else ("Output (a)" if keys[0] > keys[1] else "Output (b)")
    return verdict
