"""POPE: Polling-based Object Probing Evaluation.

Li, Du, Zhou, Wang, Zhao, Wen. "Evaluating Object Hallucination in Large Vision-Language Models",
EMNLP 2023. Each image gets yes/no probes "Is there a X in the image?": positives are objects truly
present, negatives are absent objects drawn three ways (one split each):

* ``random``: uniformly from the absent objects;
* ``popular``: the most frequent objects of the data set that are absent;
* ``adversarial``: the absent objects that co-occur most with the present ones (or, when given, the
  prior partners of the present ones, as in the bias world, where co-occurrence in images is flat).

Probes are balanced (as many negatives as positives per image). Scoring parses yes/no from free text
and reports accuracy, precision, recall, F1 (positive class "yes") and the yes-ratio per split, with
the formulas of POPE's ``evaluate.py``.

Two parses (``POPE_PARSES``):

* ``official`` (default): RUCAIBox/POPE ``evaluate.py`` exactly (``parse_pope_official``), so numbers
  compare with published POPE tables. Its known weaknesses are kept: "Nope.", "NO", "No!",
  "I don't see any dog" and "There isn't one" read as "yes".
* ``strict``: bpo-ray's own reading (``parse_yes_no``): the first yes/no word decides, then a
  negation means "no", and an answer with neither ("There is a dog.") counts "no".
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Collection, Literal, Mapping, Sequence

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
PopeParse = Literal["official", "strict"]
POPE_PARSES: tuple[str, ...] = ("official", "strict")

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_YES_WORDS = frozenset({"yes", "yeah", "yep", "yup"})
_NO_WORDS = frozenset({"no", "nope"})
_NEGATIONS = frozenset({"not", "none", "nothing", "neither", "nor", "never", "without", "cannot"})


def pope_question(name: str) -> str:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {name} in the image?"


def object_frequencies(annotations: Mapping[str, Collection[str]]) -> Counter[str]:
    """Number of images each object appears in."""
    return Counter(name for objects in annotations.values() for name in set(objects))


def cooccurrence_counts(annotations: Mapping[str, Collection[str]]) -> dict[str, Counter[str]]:
    """``counts[a][b]`` = number of images holding both a and b (a != b)."""
    counts: dict[str, Counter[str]] = {}
    for objects in annotations.values():
        present = set(objects)
        for first in present:
            counts.setdefault(first, Counter()).update(present - {first})
    return counts


def _adversarial_order(
    present: Sequence[str],
    candidates: Sequence[str],
    cooccurrence: Mapping[str, Counter[str]],
    frequencies: Counter[str],
    ranking: Mapping[str, Sequence[str]] | None,
) -> list[str]:
    """Absent candidates, most adversarial first: ranked partners round-robin, then co-occurrence."""
    absent = [name for name in candidates if name not in present]
    ordered: list[str] = []
    if ranking:
        lists = [list(ranking.get(name, ())) for name in present]
        for depth in range(max((len(ranked) for ranked in lists), default=0)):
            for ranked in lists:
                if depth < len(ranked) and ranked[depth] in absent and ranked[depth] not in ordered:
                    ordered.append(ranked[depth])

    def cooccurrence_score(name: str) -> tuple[int, int, str]:
        together = sum(cooccurrence.get(p, Counter())[name] for p in present)
        return -together, -frequencies[name], name

    ordered.extend(sorted((n for n in absent if n not in ordered), key=cooccurrence_score))
    return ordered


def build_pope_probes(
    annotations: Mapping[str, Collection[str]],
    vocabulary: Sequence[str] | None = None,
    n_per_image: int = 3,
    seed: int = 0,
    splits: Sequence[str] = POPE_SPLITS,
    adversarial_ranking: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Balanced yes/no probes for every image with at least one object.

    ``annotations`` maps an image (path or URI) to the objects in it; ``vocabulary`` is the set of
    objects negatives are drawn from (default: every object in ``annotations``). Each image gets up
    to ``n_per_image`` positives (the same in every split) and as many negatives per split as
    there are absent objects.
    Probes: ``{"id", "image", "object", "question", "label": "yes"|"no", "split"}``, yes/no alternating.
    """
    unknown = set(splits) - set(POPE_SPLITS)
    if unknown:
        raise ValueError(f"unknown POPE splits {sorted(unknown)}; choose from {POPE_SPLITS}")
    frequencies = object_frequencies(annotations)
    candidates = sorted(vocabulary if vocabulary is not None else frequencies)
    popular = sorted(candidates, key=lambda name: (-frequencies[name], name))
    cooccurrence = cooccurrence_counts(annotations)

    probes: list[dict[str, Any]] = []
    for split in splits:
        for image, objects in annotations.items():
            present = sorted(set(objects))
            if not present:
                continue
            positives = random.Random(f"pope:{seed}:{image}").sample(present, min(n_per_image, len(present)))
            if split == "random":
                absent = [name for name in candidates if name not in present]
                negatives = random.Random(f"pope:{seed}:{image}:random").sample(absent, min(len(positives), len(absent)))
            elif split == "popular":
                negatives = [name for name in popular if name not in present][: len(positives)]
            else:
                order = _adversarial_order(present, candidates, cooccurrence, frequencies, adversarial_ranking)
                negatives = order[: len(positives)]
            for index, positive in enumerate(positives):
                labelled = [(positive, "yes")] + ([(negatives[index], "no")] if index < len(negatives) else [])
                for name, label in labelled:
                    probes.append({
                        "id": f"{split}-{len(probes):06d}",
                        "image": image,
                        "object": name,
                        "question": pope_question(name),
                        "label": label,
                        "split": split,
                    })
    return probes


def parse_pope_official(answer: str) -> str:
    """'yes' or 'no' exactly as RUCAIBox/POPE ``evaluate.py`` reads an answer: keep the text before
    the first ".", delete commas, split on single spaces, and answer "no" when a piece is exactly
    "No", "no" or "not"; anything else is "yes" (so "Nope.", "NO", "No!" and "isn't" are "yes")."""
    first = answer.split(".")[0]
    pieces = first.replace(",", "").split(" ")
    return "no" if any(piece in ("No", "no", "not") for piece in pieces) else "yes"


def parse_yes_no(answer: str, default: str = "no") -> str:
    """'yes' or 'no' from a free-text answer, bpo-ray's strict parse: the first yes/no word decides.

    Without one, a negation ("There is not a dog", "I don't see one") means "no"; otherwise
    ``default``. Unlike ``parse_pope_official``, "Nope." is "no" and "There is a dog." is not "yes".
    """
    words = _WORD.findall(answer.lower().replace("\u2019", "'"))
    for word in words:
        if word in _YES_WORDS:
            return "yes"
        if word in _NO_WORDS:
            return "no"
    if any(word in _NEGATIONS or word.endswith("n't") for word in words):
        return "no"
    return default


def parse_answer(answer: str, parse: PopeParse = "official") -> str:
    """'yes' or 'no' by the named parse (``official`` POPE rule or bpo-ray's ``strict`` one)."""
    if parse == "official":
        return parse_pope_official(answer)
    if parse == "strict":
        return parse_yes_no(answer)
    raise ValueError(f"unknown POPE parse {parse!r}; choose from {POPE_PARSES}")


@dataclass(frozen=True)
class PopeScores:
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> PopeScores:
    """Binary metrics with "yes" as the positive class; empty input gives zeros."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    pairs = list(zip(labels, predictions))
    tp = sum(label == "yes" and pred == "yes" for label, pred in pairs)
    fp = sum(label == "no" and pred == "yes" for label, pred in pairs)
    tn = sum(label == "no" and pred == "no" for label, pred in pairs)
    fn = sum(label == "yes" and pred == "no" for label, pred in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return PopeScores(
        accuracy=(tp + tn) / n if n else 0.0,
        precision=precision,
        recall=recall,
        f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        yes_ratio=(tp + fp) / n if n else 0.0,
        n=n,
        true_positives=tp,
        false_positives=fp,
        true_negatives=tn,
        false_negatives=fn,
    )


def score_pope(probes: Sequence[Mapping[str, Any]], answers: Sequence[str],
               parse: PopeParse = "official") -> dict[str, PopeScores]:
    """Metrics per split, in ``POPE_SPLITS`` order, for free-text ``answers[i]`` to ``probes[i]``,
    each answer read by ``parse``."""
    if len(probes) != len(answers):
        raise ValueError(f"{len(probes)} probes but {len(answers)} answers")
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    for probe, answer in zip(probes, answers):
        labels, predictions = by_split.setdefault(probe["split"], ([], []))
        labels.append(probe["label"])
        predictions.append(parse_answer(answer, parse))
    order = [s for s in POPE_SPLITS if s in by_split] + [s for s in by_split if s not in POPE_SPLITS]
    return {split: pope_metrics(*by_split[split]) for split in order}
