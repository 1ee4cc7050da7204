"""AMBER scores as its official ``inference.py`` computes them (junyangwang0410/AMBER, Wang et al. 2023).

Discriminative (ids > 1004 in ``annotations.json``): a response counts only when it is exactly
"Yes" or "No" (no stripping, no case folding, as the reference compares strings). "No" is the
positive class: precision = truth-"no" among responses "No", recall = responses "No" among
truth "no". Types: existence (``discriminative-hallucination``), attribute (``-attribute-state``,
``-number``, ``-action``) and relation (``discriminative-relation`` and ``relation``).

Generative (``type == "generative"``): nouns of the response (NLTK tagger + WordNet lemma in the
reference; pluggable here) that are in ``relation.json`` are matched, one by one and skipping
``safe_words.txt``, against the truth objects and their associated words, then the hallucination
objects; a noun neither equal to nor similar to (spaCy similarity > threshold) a truth word is a
hallucinated mention. CHAIR = hallucinated mentions / mentions, Cover = truth objects covered /
truth objects, Hal = share of responses with a hallucinated mention, Cog = hallucination objects
covered / hallucination objects.

The reference's arithmetic is kept for comparable numbers: every denominator starts at 0.001
(``data/metrics.txt``), each printed number is ``round(100 * x, 1)``, F1 is computed from the
rounded precision and recall with ``+ 0.0001`` in its denominator (``+ 0.001`` for existence).
The similarity (spaCy ``en_core_web_lg``, not installable here) is a callable the caller passes.
This module writes the procedure itself; no reference code is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

Similarity = Callable[[str, str], float]
NounExtractor = Callable[[str], list[str]]

DISCRIMINATIVE_GROUPS: dict[str, str] = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
}  # anything else that is not generative counts as relation, as in the reference
_EPS = 0.001  # the reference's initial denominators (data/metrics.txt)


@dataclass
class _Tally:
    correct: float = 0.0
    total: float = _EPS
    no_correct: float = 0.0  # truth "no" answered "No"
    truth_no: float = _EPS
    answered_no: float = _EPS

    def add(self, truth: str, response: str) -> None:
        self.total += 1
        if truth == "yes":
            self.correct += response == "Yes"
        else:
            self.truth_no += 1
            if response == "No":
                self.correct += 1
                self.no_correct += 1
        if response == "No":
            self.answered_no += 1

    def __add__(self, other: "_Tally") -> "_Tally":
        # the reference sums raw counts over the attribute types but adds each type's 0.001
        return _Tally(self.correct + other.correct, self.total + other.total, self.no_correct + other.no_correct,
                      self.truth_no + other.truth_no, self.answered_no + other.answered_no)

    def printed(self, f1_eps: float = 0.0001) -> dict[str, float]:
        accuracy = round(self.correct / self.total * 100, 1)
        precision = round(self.no_correct / self.answered_no * 100, 1)
        recall = round(self.no_correct / self.truth_no * 100, 1)
        f1 = round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + f1_eps) * 100, 1)
        return {"Accuracy": accuracy, "Precision": precision, "Recall": recall, "F1": f1}


def score_discriminative(items: Iterable[tuple[str, str, str]]) -> dict[str, dict[str, float]]:
    """``items``: ``(annotation type, truth "yes"/"no", response)``; returns the reference's printed
    sections: ``Descriminative Task`` (its spelling kept as the key ``all``), existence, attribute,
    state, number, action, relation."""
    tallies = {name: _Tally() for name in ("existence", "state", "number", "action", "relation")}
    overall = _Tally()
    for kind, truth, response in items:
        if truth not in ("yes", "no"):
            raise ValueError(f"AMBER discriminative truth must be 'yes' or 'no', got {truth!r}")
        tallies[DISCRIMINATIVE_GROUPS.get(kind, "relation")].add(truth, response)
        overall.add(truth, response)
    attribute = tallies["state"] + tallies["number"] + tallies["action"]
    return {"all": overall.printed(), "existence": tallies["existence"].printed(f1_eps=0.001),
            "attribute": attribute.printed(), **{k: tallies[k].printed() for k in ("state", "number", "action", "relation")}}


@dataclass
class GenerativeItem:
    """One description scored: its relevant nouns, which were hallucinated, what it covered."""

    nouns: list[str]
    hallucinated: list[str]
    covered_truth: list[str]
    covered_hallu: list[str]


def _mark(words: list[str], owners: list[int], n_objects: int, index: int, flags: list[int]) -> None:
    """Flag the object that ``words[index]`` belongs to: an associated word flags its object, an
    object name itself (the last ``n_objects`` words) flags itself; as the reference indexes."""
    if index < len(owners) - n_objects:
        flags[owners[index] + len(owners) - n_objects] = 1
    else:
        flags[index] = 1


def score_generative_item(nouns: Sequence[str], truth: Sequence[str], hallu: Sequence[str],
                          association: Mapping[str, Sequence[str]], safe_words: Iterable[str],
                          similarity: Similarity, threshold: float = 0.8) -> GenerativeItem:
    """The reference's per-response loop (``inference.py`` ``main``, generative branch)."""
    vocabulary = set(association) | {w for words in association.values() for w in words}
    relevant = [noun for noun in nouns if noun in vocabulary]
    safe = set(safe_words)
    safe_words_l, safe_owner = [], []
    for i, word in enumerate(truth):
        safe_words_l += list(association[word])
        safe_owner += [i] * len(association[word])
    ha_words, ha_owner = [], []
    for i, word in enumerate(hallu):
        ha_words += list(association[word])
        ha_owner += [i] * len(association[word])
    safe_words_l += list(truth)
    safe_owner += [0] * len(truth)
    ha_words += list(hallu)
    ha_owner += [0] * len(hallu)
    hallucinated_flags = [0] * len(relevant)
    for idx, noun in enumerate(relevant):
        if noun in safe:
            continue
        if noun in safe_words_l:
            _mark(safe_words_l, safe_owner, len(truth), safe_words_l.index(noun), safe_owner)
            continue
        if noun in ha_words:
            _mark(ha_words, ha_owner, len(hallu), ha_words.index(noun), ha_owner)
        for j, word in enumerate(ha_words):
            if similarity(noun, word) > threshold:
                _mark(ha_words, ha_owner, len(hallu), j, ha_owner)
                break
        similar = False
        for j, word in enumerate(safe_words_l):
            if similarity(noun, word) > threshold:
                similar = True
                _mark(safe_words_l, safe_owner, len(truth), j, safe_owner)
                break
        if not similar:
            hallucinated_flags[idx] = 1
    covered_t = [w for w, f in zip(truth, safe_owner[len(safe_owner) - len(truth):]) if f]
    covered_h = [w for w, f in zip(hallu, ha_owner[len(ha_owner) - len(hallu):]) if f]
    return GenerativeItem(relevant, [n for n, f in zip(relevant, hallucinated_flags) if f], covered_t, covered_h)


@dataclass
class GenerativeReport:
    items: list[GenerativeItem] = field(default_factory=list)
    truth_sizes: list[int] = field(default_factory=list)
    hallu_sizes: list[int] = field(default_factory=list)

    def printed(self) -> dict[str, float]:
        """CHAIR, Cover, Hal, Cog as the reference prints them (percent, 1 decimal)."""
        mentions = sum(len(i.nouns) for i in self.items) + _EPS
        hallucinated = sum(len(i.hallucinated) for i in self.items)
        cover = sum(len(i.covered_truth) for i in self.items) / (sum(self.truth_sizes) + _EPS)
        cog = sum(len(i.covered_hallu) for i in self.items) / (sum(self.hallu_sizes) + _EPS)
        clean = sum(not i.hallucinated for i in self.items) / (len(self.items) + _EPS)
        return {"CHAIR": round(hallucinated / mentions * 100, 1), "Cover": round(cover * 100, 1),
                "Hal": round(100 - clean * 100, 1), "Cog": round(cog * 100, 1)}


def score_generative(rows: Sequence[tuple[Sequence[str], Sequence[str], Sequence[str]]],
                     association: Mapping[str, Sequence[str]], safe_words: Iterable[str],
                     similarity: Similarity, threshold: float = 0.8) -> GenerativeReport:
    """``rows``: ``(nouns of the response, truth objects, hallucination objects)`` per description."""
    safe = list(safe_words)
    report = GenerativeReport()
    for nouns, truth, hallu in rows:
        report.items.append(score_generative_item(nouns, truth, hallu, association, safe, similarity, threshold))
        report.truth_sizes.append(len(truth))
        report.hallu_sizes.append(len(hallu))
    return report


def nltk_noun_extractor(wordnet_dir: Optional[str] = None) -> NounExtractor:
    """The reference's ``extract_nouns``: ``word_tokenize`` + NLTK ``pos_tag`` (tags starting "NN"),
    WordNet lemma. Needs the ``nltk`` package with its tagger data installed (not a bpo-ray
    dependency); tokens come from ``bpo_ray.metrics.nltk_tokenize`` (NLTK 3.8.1's rules, so Punkt's
    data is not needed) and lemmas from ``bpo_ray.metrics.wordnet``."""
    try:
        import nltk
    except ImportError as exc:
        raise RuntimeError("AMBER generative scoring needs a noun extractor: install nltk and its "
                           "averaged_perceptron_tagger data, or pass one") from exc
    from bpo_ray.metrics.nltk_tokenize import word_tokenize
    from bpo_ray.metrics.wordnet import NounLemmatizer

    lemmatizer = NounLemmatizer.from_dir(wordnet_dir)

    def extract(text: str) -> list[str]:
        tagged = nltk.pos_tag(word_tokenize(text))
        return [lemmatizer.lemmatize(word) for word, tag in tagged if tag.startswith("NN")]

    return extract
