"""CHAIR: Caption Hallucination Assessment with Image Relevance.

Rohrbach, Hendricks, Burns, Darrell, Saenko. "Object Hallucination in Image Captioning", EMNLP 2018.
Object HalBench (used by the BPO paper, reported as "Resp" and "Obj") is CHAIR on detailed answers.

Given a caption and the set of objects truly in the image:

* CHAIR_s (sentence level, "Resp") = captions with >= 1 hallucinated object / all captions;
* CHAIR_i (instance level, "Obj")  = hallucinated object mentions / all object mentions.

Object mentions are found by one of two matchers behind one interface (``MentionExtractor``):

* ``ObjectMentionExtractor``: a synonym table (surface form -> canonical object), a plain
  ``dict[str, str]``, so the same code takes the bias world's closed vocabulary or COCO's table
  (``synonyms_from_lines`` reads the original ``synonyms.txt``). Matching is whole-word on
  lower-cased tokens, longest form first (so "hot dog" is not a dog, "dog leash" is a leash), and
  plural forms are generated for every surface form instead of lemmatizing the caption. The bias
  world's CHAIR numbers come from this matcher.
* ``bpo_ray.metrics.rohrbach.RohrbachExtractor``: COCO captions matched token for token as the
  reference implementation (LisaAnne/Hallucination ``utils/chair.py``) does, with its deliberate
  rules ("baby bird" is a bird, "passenger jet" no person, "toilet seat" no chair, "train track"
  no train) and, in ``mode="rohrbach"``, its defects ("bus" -> "bu"); ``mode="corrected"`` fixes them.

As in the reference implementation, repeated mentions count each time and negation ("there is no
dog") is not detected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping, Protocol, Sequence, Union

IRREGULAR_PLURALS: dict[str, str] = {
    "mouse": "mice", "knife": "knives", "person": "people", "man": "men", "woman": "women",
    "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese", "leaf": "leaves",
    "shelf": "shelves", "wife": "wives", "life": "lives", "loaf": "loaves", "wolf": "wolves",
    "calf": "calves", "half": "halves", "scarf": "scarves", "ox": "oxen",
    "sheep": "sheep", "fish": "fish", "deer": "deer", "bison": "bison",
}

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric words. Punctuation splits words, so "tooth-brush" is two tokens
    and a possessive "dog's" leaves a token "s" that keeps "dog's leash" from reading as "dog leash"."""
    return _TOKEN.findall(text.lower())


def plural_forms(word: str) -> set[str]:
    """Plausible plurals of one English noun (regular rules plus a small irregular table)."""
    forms = {word + "s"}
    if word in IRREGULAR_PLURALS:
        forms.add(IRREGULAR_PLURALS[word])
    if re.search(r"(s|x|z|ch|sh|o)$", word):
        forms.add(word + "es")
    if re.search(r"[^aeiou]y$", word):
        forms.add(word[:-1] + "ies")
    return forms


def plural_phrases(tokens: Sequence[str]) -> set[tuple[str, ...]]:
    """Plurals of a phrase: the head noun changes ("sheets of paper", "hot dogs")."""
    head = list(tokens[1:]).index("of") if "of" in tokens[1:] else len(tokens) - 1
    return {(*tokens[:head], form, *tokens[head + 1:]) for form in plural_forms(tokens[head])}


@dataclass(frozen=True)
class ObjectMention:
    surface: str  # the matched words, space-joined
    canonical: str
    token_index: int


class ObjectMentionExtractor:
    """Finds object mentions in text with a synonym table; reusable across captions."""

    def __init__(self, synonyms: Mapping[str, str], include_plurals: bool = True):
        index: dict[tuple[str, ...], str] = {}
        explicit: dict[tuple[str, ...], str] = {}
        for surface, canonical in synonyms.items():
            tokens = tuple(tokenize(surface))
            if tokens:
                explicit[tokens] = canonical
        for canonical in set(synonyms.values()):
            tokens = tuple(tokenize(canonical))
            if tokens:
                explicit.setdefault(tokens, canonical)
        if include_plurals:
            for tokens, canonical in explicit.items():
                for plural in plural_phrases(tokens):
                    index.setdefault(plural, canonical)
        index.update(explicit)  # a listed form always beats a generated plural
        self.index = index
        self.max_words = max((len(tokens) for tokens in index), default=0)

    def extract(self, text: str) -> list[ObjectMention]:
        """Mentions left to right; at each position the longest matching form wins."""
        tokens = tokenize(text)
        mentions: list[ObjectMention] = []
        i = 0
        while i < len(tokens):
            for width in range(min(self.max_words, len(tokens) - i), 0, -1):
                phrase = tuple(tokens[i:i + width])
                if phrase in self.index:
                    mentions.append(ObjectMention(" ".join(phrase), self.index[phrase], i))
                    i += width
                    break
            else:
                i += 1
        return mentions

    def canonical(self, name: str) -> str:
        """Canonical object for a name ('mugs' -> 'cup'); unknown names are returned unchanged."""
        return self.index.get(tuple(tokenize(name)), name)


class MentionExtractor(Protocol):
    """What CHAIR needs from an object matcher: ``ObjectMentionExtractor`` (any synonym table) or
    ``bpo_ray.metrics.rohrbach.RohrbachExtractor`` (COCO, as the reference implementation matches)."""

    def extract(self, text: str) -> list[ObjectMention]: ...

    def canonical(self, name: str) -> str: ...


@dataclass
class ChairItem:
    caption: str
    ground_truth: list[str]  # canonical objects in the image, sorted
    mentioned: list[str]  # canonical objects mentioned, in caption order (repeats kept)
    hallucinated: list[str]  # the mentioned ones not in ground_truth, in caption order

    @property
    def is_hallucinated(self) -> bool:
        return bool(self.hallucinated)

    @property
    def chair_i(self) -> float:
        return len(self.hallucinated) / len(self.mentioned) if self.mentioned else 0.0

    @property
    def recall(self) -> float:
        """Share of ground-truth objects the caption mentions (coverage; not part of CHAIR)."""
        if not self.ground_truth:
            return 0.0
        return len(set(self.mentioned) & set(self.ground_truth)) / len(self.ground_truth)


@dataclass
class ChairReport:
    chair_s: float
    chair_i: float
    recall: float
    n_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    items: list[ChairItem] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Aggregate numbers only (what a report table shows)."""
        return {
            "chair_s": self.chair_s,
            "chair_i": self.chair_i,
            "recall": self.recall,
            "n_captions": self.n_captions,
            "n_mentions": self.n_mentions,
            "n_hallucinated_mentions": self.n_hallucinated_mentions,
        }


def score_caption(
    caption: str, ground_truth: Collection[str], extractor: MentionExtractor, unique_mentions: bool = False
) -> ChairItem:
    """CHAIR details of one caption. ``unique_mentions`` counts each object once per caption."""
    truth = sorted({extractor.canonical(name) for name in ground_truth})
    mentioned = [mention.canonical for mention in extractor.extract(caption)]
    if unique_mentions:
        mentioned = list(dict.fromkeys(mentioned))
    hallucinated = [name for name in mentioned if name not in truth]
    return ChairItem(caption, truth, mentioned, hallucinated)


def score_chair(
    captions: Sequence[str],
    ground_truths: Sequence[Collection[str]],
    synonyms: Union[Mapping[str, str], MentionExtractor],
    unique_mentions: bool = False,
) -> ChairReport:
    """CHAIR_s and CHAIR_i over captions, with per-caption details; ``ground_truths[i]`` is the
    set of canonical objects in the image of ``captions[i]``. ``synonyms`` is a synonym table
    (matched by ``ObjectMentionExtractor``) or a ready extractor such as Rohrbach's COCO rules."""
    if len(captions) != len(ground_truths):
        raise ValueError(f"{len(captions)} captions but {len(ground_truths)} ground-truth sets")
    extractor = ObjectMentionExtractor(synonyms) if isinstance(synonyms, Mapping) else synonyms
    items = [score_caption(c, gt, extractor, unique_mentions) for c, gt in zip(captions, ground_truths)]
    return chair_report(items)


def chair_report(items: Sequence[ChairItem]) -> ChairReport:
    """Aggregate per-caption details: CHAIR_s = captions with a hallucination / captions,
    CHAIR_i = hallucinated mentions / all mentions (Rohrbach et al. 2018), plus recall."""
    items = list(items)
    n_mentions = sum(len(item.mentioned) for item in items)
    n_hallucinated = sum(len(item.hallucinated) for item in items)
    n_truth = sum(len(item.ground_truth) for item in items)
    n_recalled = sum(len(set(item.mentioned) & set(item.ground_truth)) for item in items)
    return ChairReport(
        chair_s=sum(item.is_hallucinated for item in items) / len(items) if items else 0.0,
        chair_i=n_hallucinated / n_mentions if n_mentions else 0.0,
        recall=n_recalled / n_truth if n_truth else 0.0,
        n_captions=len(items),
        n_mentions=n_mentions,
        n_hallucinated_mentions=n_hallucinated,
        items=items,
    )


def prior_typical_share(items: Iterable[ChairItem], prior_partners: Mapping[str, str | Collection[str]]) -> float:
    """Share of hallucinated mentions that name a prior partner of an object truly present.

    ``prior_partners`` maps an object to its partner (bias world) or to a collection of typical
    co-occurring objects (e.g. COCO co-occurrence top-k). High values mean the hallucinations come
    from the language prior rather than from noise.
    """
    typical = total = 0
    for item in items:
        expected: set[str] = set()
        for present in item.ground_truth:
            partners = prior_partners.get(present, ())
            expected.update({partners} if isinstance(partners, str) else partners)
        total += len(item.hallucinated)
        typical += sum(name in expected for name in item.hallucinated)
    return typical / total if total else 0.0


def synonyms_from_lines(lines: Iterable[str]) -> dict[str, str]:
    """Read CHAIR's ``synonyms.txt`` format: 'canonical, synonym, synonym, ...' per line."""
    synonyms: dict[str, str] = {}
    for line in lines:
        names = [name.strip() for name in line.split(",") if name.strip()]
        if names:
            for name in names:
                synonyms.setdefault(name, names[0])
    return synonyms
