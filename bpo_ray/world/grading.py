"""How the bias world's annotator grades an answer: the facts a question asks for, read from the
scene (or from the ground-truth text), compared with the facts an answer states.

This is the rulebook of the *world's annotator*, a person who sees the scene and its ground truth,
not a model: it stands in for GPT-4 behind the judge proxy so every judged benchmark runs offline
(``bpo_ray.world.judge_server`` speaks the protocols; docs/world.md, "The world's annotator",
lists the rules). Everything is a pure function of its text inputs and the scene: same prompt, same
grade.

Question types are the world's own (``bpo_ray.world.scenes``): existence, colour, count,
position, listing, and description (any other question: the detailed-caption prompts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Optional

from bpo_ray.metrics.chair import ObjectMentionExtractor, tokenize
from bpo_ray.metrics.pope import parse_yes_no
from bpo_ray.world import grammar, vocab

#: kind -> (colour, positions): what the annotator knows about one scene.
SceneTruth = Mapping[str, tuple[str, tuple[str, ...]]]

SHORT_TYPES = ("existence", "colour", "count", "position")
_NEGATORS = frozenset({"no", "not", "without"})
_COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "a": 1, "an": 1}
_POSITIONS = sorted(vocab.POSITIONS, key=len, reverse=True)
_POSITION_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p in _POSITIONS) + r")\b")
_COLOUR_ALIASES = {"grey": "gray"}


@lru_cache(maxsize=1)
def _extractor() -> ObjectMentionExtractor:
    return ObjectMentionExtractor(vocab.SYNONYMS)


def question_type(question: str) -> str:
    """The world's question type from the question text (``description`` for anything else)."""
    q = question.strip().lower()
    for prefix, kind in (("is there", "existence"), ("are there", "existence"), ("what colour", "colour"),
                         ("what color", "colour"), ("how many", "count"), ("where", "position"),
                         ("what objects", "listing")):
        if q.startswith(prefix):
            return kind
    return "description"


def kinds_in(text: str) -> frozenset[str]:
    """Object kinds a text says are there: synonym-table mentions, minus negated ones ("The saucer
    no.", "there is no dog", "not a cup")."""
    tokens = tokenize(text)
    found = set()
    for mention in _extractor().extract(text):
        end = mention.token_index + len(mention.surface.split())
        after = tokens[end] if end < len(tokens) else ""
        before = tokens[max(0, mention.token_index - 2):mention.token_index]
        if (after == "no" and before[-1:] == ["the"]) or _NEGATORS.intersection(before):  # "The cup no."
            continue
        found.add(mention.canonical)
    return frozenset(found)


def asked_kind(question: str) -> Optional[str]:
    """The kind a short question is about ("Is there a mug ...?" -> "cup"), or ``None``."""
    mentions = _extractor().extract(question)
    return mentions[0].canonical if mentions else None


def colours_in(text: str) -> list[str]:
    words = [_COLOUR_ALIASES.get(w, w) for w in tokenize(text)]
    return [w for w in words if w in vocab.COLOURS]


def count_in(text: str) -> Optional[int]:
    """The first count stated ("Two.", "There are 3 cups", "a cup" -> 1)."""
    for word in tokenize(text):
        if word.isdigit():
            return int(word)
        if word in _COUNT_WORDS:
            return _COUNT_WORDS[word]
    return None


def positions_in(text: str) -> frozenset[str]:
    """Grid cells named in a text, longest phrase first ("top left" is not also "top")."""
    return frozenset(m.group(1) for m in _POSITION_RE.finditer(" ".join(tokenize(text))))


def scene_from_caption(caption: str) -> Optional[dict[str, tuple[str, tuple[str, ...]]]]:
    """A scene's truth from its ground-truth caption (the world's grammar), or ``None``."""
    groups = grammar.parse_caption(caption)
    if groups is None:
        return None
    truth: dict[str, tuple[str, tuple[str, ...]]] = {}
    for kind, colour, positions in groups:
        old = truth.get(kind)
        truth[kind] = (colour, (old[1] if old else ()) + tuple(positions))
    return truth


@dataclass(frozen=True)
class Expected:
    """What a correct answer to one question states."""

    qtype: str
    kind: Optional[str] = None               # the asked kind (short questions)
    present: Optional[bool] = None           # existence
    colour: Optional[str] = None
    count: Optional[int] = None
    positions: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()      # listing / description: every kind in the scene


def expected_from_scene(question: str, scene: SceneTruth) -> Expected:
    """The true answer's facts, read off the scene (what an annotator looking at it knows)."""
    qtype = question_type(question)
    kind = asked_kind(question)
    if qtype in SHORT_TYPES and kind is not None:
        if qtype == "existence":
            return Expected(qtype, kind, present=kind in scene)
        if kind in scene:
            colour, positions = scene[kind]
            return Expected(qtype, kind, True, colour, len(positions), frozenset(positions))
        return Expected("existence", kind, present=False)  # asks about an absent kind: it is not there
    return Expected("description" if qtype in SHORT_TYPES else qtype, kinds=frozenset(scene))


def expected_from_reference(question: str, reference: str) -> Expected:
    """The true answer's facts, read off a ground-truth answer (when the scene is not at hand)."""
    qtype = question_type(question)
    kind = asked_kind(question)
    if qtype == "existence":
        return Expected(qtype, kind, present=parse_yes_no(reference, default="no") == "yes")
    if qtype == "colour":
        colours = colours_in(reference)
        return Expected(qtype, kind, True, colour=colours[0] if colours else None)
    if qtype == "count":
        return Expected(qtype, kind, True, count=count_in(reference))
    if qtype == "position":
        return Expected(qtype, kind, True, positions=positions_in(reference))
    return Expected(qtype, kinds=kinds_in(reference))


@dataclass(frozen=True)
class Grade:
    """One answer against what a correct one states.

    ``correctness`` 0-1 (exact facts; for listings and descriptions the Jaccard overlap of kinds),
    ``coverage`` 0-1 (share of the asked facts the answer gives), ``hallucinated`` kinds the answer
    names that are not in the scene, ``false_claim`` a stated fact that is wrong.
    """

    qtype: str
    correctness: float
    coverage: float
    hallucinated: tuple[str, ...] = ()
    false_claim: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def hallucination(self) -> bool:
        return bool(self.hallucinated) or self.false_claim


def grade_answer(expected: Expected, answer: str, scene_kinds: Optional[frozenset[str]] = None) -> Grade:
    """Compare ``answer`` with ``expected``; ``scene_kinds`` (when known) are every kind present,
    so a short answer naming an absent object is a hallucination too."""
    mentioned = kinds_in(answer)
    if scene_kinds is not None:
        allowed = scene_kinds
    elif expected.qtype in SHORT_TYPES:
        allowed = frozenset({expected.kind} if expected.kind and expected.present is not False else ())
    else:
        allowed = expected.kinds
    hallucinated = tuple(sorted(mentioned - allowed))
    notes = [f"names absent {', '.join(hallucinated)}"] if hallucinated else []
    q = expected.qtype
    if q == "existence":
        said = parse_yes_no(answer, default="none")
        right = said == ("yes" if expected.present else "no")
        wrong = said != "none" and not right
        if said == "none":
            notes.append("gives no yes/no decision")
        elif wrong:
            notes.append(f"says {said} but the {expected.kind} is {'there' if expected.present else 'not there'}")
        return Grade(q, float(right), float(right), hallucinated, wrong, notes)
    if q == "colour":
        said = set(colours_in(answer))
        right = expected.colour in said
        others = said - {expected.colour}
        correctness = 1.0 if right and not others else (0.5 if right else 0.0)
        if others:
            notes.append(f"wrong colour {', '.join(sorted(others))} (it is {expected.colour})")
        return Grade(q, correctness, float(right), hallucinated, bool(others), notes)
    if q == "count":
        said = count_in(answer)
        right = said is not None and said == expected.count
        if said is not None and not right:
            notes.append(f"counts {said}, there are {expected.count}")
        return Grade(q, float(right), float(right), hallucinated, said is not None and not right, notes)
    if q == "position":
        said = positions_in(answer)
        truth = expected.positions
        overlap = len(said & truth)
        wrong = said - truth
        if wrong:
            notes.append(f"wrong place {', '.join(sorted(wrong))}")
        return Grade(q, overlap / len(said | truth) if said | truth else 0.0,
                     overlap / len(truth) if truth else 0.0, hallucinated, bool(wrong), notes)
    truth = expected.kinds
    union = mentioned | truth
    correctness = len(mentioned & truth) / len(union) if union else 1.0
    coverage = len(mentioned & truth) / len(truth) if truth else 1.0
    missing = sorted(truth - mentioned)
    if missing:
        notes.append(f"leaves out {', '.join(missing)}")
    return Grade(q, correctness, coverage, hallucinated, False, notes)


def explain(grade: Grade) -> str:
    """One sentence saying why (what an annotator would write beside the grade)."""
    if not grade.notes:
        return "The answer agrees with the scene."
    return "The answer " + "; ".join(grade.notes) + "."


# ---------------------------------------------------------------------------------------------
# Each benchmark's scale


def mmvet_grade(grade: Grade) -> float:
    """MM-Vet correctness 0.0-1.0 in steps of 0.1."""
    return round(grade.correctness, 1)


def llava_score(grade: Grade) -> int:
    """LLaVA-Bench's 1-10 overall score: 1 + 9 x correctness, rounded half up."""
    return 1 + int(9 * grade.correctness + 0.5)


def mmhal_rating(grade: Grade) -> int:
    """MMHal-Bench's 0-6 rating (the official rubric: 3-6 without hallucination, 0-2 with it).

    Informative = coverage of the asked facts. Without hallucination: 6 complete and exact
    (coverage 1, correctness 1: the world's answers carry no "analysis or reasoning", so exactness
    stands in for it), 5 at least half covered, 4 some, 3 none. With hallucination: 2 at least
    half covered, 1 some, 0 none.
    """
    c = grade.coverage
    if grade.hallucination:
        return 2 if c >= 0.5 else (1 if c > 0 else 0)
    if c >= 1.0 and grade.correctness >= 1.0:
        return 6
    return 5 if c >= 0.5 else (4 if c > 0 else 3)


def coherence(answer: str, qtype: str) -> int:
    """HelpSteer coherence 0-4 from the world's grammar: 0 empty, 1 a sentence repeated word for
    word, 4 a well-formed caption (``grammar.is_well_formed``) or a one-sentence short answer,
    2 anything else (fluent-looking text outside the world's grammar)."""
    text = answer.strip()
    if not text:
        return 0
    sentences = [s.strip() for s in re.findall(r"[^.!?]+[.!?]?", text) if s.strip()]
    if len(set(sentences)) < len(sentences):
        return 1
    if grammar.is_well_formed(text):
        return 4
    if qtype != "description" and len(sentences) == 1:
        return 4
    return 2


def helpsteer_scores(grade: Grade, answer: str) -> dict[str, int]:
    """Li et al. 2024's three HelpSteer attributes, 0-4 each."""
    return {"helpfulness": int(4 * grade.coverage + 0.5), "correctness": int(4 * grade.correctness + 0.5),
            "coherence": coherence(answer, grade.qtype)}


def word_count(text: str) -> int:
    """Words (runs of letters or digits; punctuation is not a word)."""
    return len(re.findall(r"[^\W_]+", text))


def complexity(answer: str) -> int:
    """HelpSteer complexity 0-4 from the answer's structure: 0 empty; 1 at most two words ("Yes.",
    "Two cups."); 2 one sentence without a modifier; 3 one sentence with a colour or a position, or
    several sentences without; 4 several sentences with colours or positions (caption-level prose)."""
    n = word_count(answer)
    if not n:
        return 0
    if n <= 2:
        return 1
    sentences = [x for x in re.findall(r"[^.!?]+", answer) if x.strip()]
    modified = bool(colours_in(answer) or positions_in(answer))
    if len(sentences) <= 1:
        return 3 if modified else 2
    return 4 if modified else 3


def verbosity(answer: str, reference: str) -> int:
    """HelpSteer verbosity 0-4 from length against the reference answer: with r = answer words /
    reference words (at least 1), 0 empty, 1 r < 0.5, 2 0.5 <= r <= 1.5, 3 1.5 < r <= 3, 4 r > 3."""
    n = word_count(answer)
    if not n:
        return 0
    r = n / max(1, word_count(reference))
    return 1 if r < 0.5 else 2 if r <= 1.5 else 3 if r <= 3 else 4


def helpsteer_ratings(grade: Grade, answer: str, reference: str) -> dict[str, int]:
    """All five HelpSteer attributes (Li et al. 2024, section 2.5), 0-4 each: ``helpsteer_scores`` plus
    ``complexity`` (structure) and ``verbosity`` (length against ``reference``)."""
    return {**helpsteer_scores(grade, answer), "complexity": complexity(answer),
            "verbosity": verbosity(answer, reference)}


def true_answer(question: str, scene: SceneTruth) -> str:
    """The annotator's own answer to a question about a scene, in the world's answer style
    (``bpo_ray.world.scenes``): what the judge-answer SFT baseline of Li et al. 2024 trains on.

    existence "The cup yes." / "The dog no."; colour "Red."; count "Two."; position "On the left
    and at the top."; listing "A red cup and two blue dogs."; anything else the detailed caption.
    A short question about an absent kind is answered as an existence question.
    """
    from bpo_ray.world.scenes import Scene, SceneObject, describe_scene, list_objects

    objects = sorted((SceneObject(kind, colour, p) for kind, (colour, positions) in scene.items() for p in positions),
                     key=lambda o: vocab.POSITIONS.index(o.position))
    world_scene = Scene("annotator", tuple(objects))
    qtype, kind = question_type(question), asked_kind(question)
    if qtype in SHORT_TYPES and kind is not None:
        if qtype == "existence" or kind not in scene:
            return vocab.existence_answer(kind, kind in scene)
        colour, positions = scene[kind]
        if qtype == "colour":
            return colour.capitalize() + "."
        if qtype == "count":
            return vocab.COUNT_WORDS[len(positions)].capitalize() + "."
        phrases = [vocab.POSITION_PHRASES[p] for p in sorted(positions, key=vocab.POSITIONS.index)]
        joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return joined[:1].upper() + joined[1:] + "."
    if not objects:
        return "There are no objects in the image."
    return list_objects(world_scene) if qtype == "listing" else describe_scene(world_scene)


_LAST_QUESTION = re.compile(r"^(?P<caption>.*?)\s*(?P<question>[^.!?]*\?)\s*$", re.S)


def split_text_question(text: str) -> tuple[str, str]:
    """A world text question (``"<caption> Is there a cup in the image?"``) as (caption, question)."""
    match = _LAST_QUESTION.match(text.strip())
    if not match:
        return "", text.strip()
    return match["caption"].strip(), match["question"].strip()


def mtbench_rating(grade: Grade, answer: str) -> int:
    """MT-Bench's 1-10 rating of a world text answer: 1 + round(9 x correctness); minus 2 when it is
    not coherent (``coherence`` < 4: repetition or text outside the world's grammar); at most 3 when
    it states something false or names an absent object; never below 1."""
    rating = 1 + int(9 * grade.correctness + 0.5)
    if coherence(answer, grade.qtype) < 4:
        rating -= 2
    if grade.hallucination:
        rating = min(rating, 3)
    return max(1, rating)


def pairwise_key(grade: Grade, answer: str) -> tuple:
    """What decides an AlpacaEval comparison in the world: no hallucination first, then
    correctness, coverage and coherence; equal keys are a tie."""
    return (not grade.hallucination, round(grade.correctness, 6), round(grade.coverage, 6),
            coherence(answer, grade.qtype))
