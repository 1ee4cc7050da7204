"""Is a caption a well-formed sentence sequence of the bias world's grammar?

The world's detailed captions (``scenes.describe_group``) are one sentence per kind:

    There is a red cup on the left.
    There are two blue dogs, at the top and on the right.

A fluency measure built on it catches the collapse that CHAIR alone misses: a DPO run that
drives the chosen answers' likelihood down produced "There is a purple the center. There is a
purple the center." (docs/world.md), which names few objects, so its CHAIR_i can even look good.
A caption is well-formed when it is non-empty, every sentence parses (counts agree with the
number of positions) and no sentence is repeated word for word. Describing two objects of one
kind in two sentences ("There is a yellow pen at the top. There is a yellow pen on the left.")
departs from the ground truth's style but is fluent, so it counts as well-formed; whether the
objects are really there is CHAIR's business, not fluency's.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

from bpo_ray.world import vocab


def _alternatives(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


@lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], dict[str, str], dict[str, str]]:
    colours = _alternatives(vocab.COLOURS)
    kinds = _alternatives(vocab.OBJECT_KINDS)
    plurals = {vocab.plural_of(k): k for k in vocab.OBJECT_KINDS}
    phrases = {phrase: position for position, phrase in vocab.POSITION_PHRASES.items()}
    phrase = _alternatives(phrases)
    one = re.compile(rf"There is (?:a|an) (?P<colour>{colours}) (?P<kind>{kinds}) (?P<where>{phrase})\.")
    many = re.compile(rf"There are (?P<count>two|three) (?P<colour>{colours}) (?P<kind>{_alternatives(plurals)}), "
                      rf"(?P<where>(?:{phrase})(?:, (?:{phrase}))* and (?:{phrase}))\.")
    return one, many, plurals, phrases


_SENTENCE = re.compile(r"[^.]*\.")


def parse_caption(text: str) -> Optional[list[tuple[str, str, tuple[str, ...]]]]:
    """``[(kind, colour, positions), ...]`` for a well-formed caption, else None."""
    one, many, plurals, phrases = _patterns()
    text = text.strip()
    sentences = [s.strip() for s in _SENTENCE.findall(text)]
    if not sentences or "".join(sentences).replace(" ", "") != text.replace(" ", ""):
        return None
    groups = []
    for sentence in sentences:
        m = one.fullmatch(sentence)
        if m:
            groups.append((m["kind"], m["colour"], (phrases[m["where"]],)))
            continue
        m = many.fullmatch(sentence)
        if not m:
            return None
        where = tuple(phrases[p] for p in re.split(r", | and ", m["where"]))
        if len(where) != {"two": 2, "three": 3}[m["count"]]:
            return None
        groups.append((plurals[m["kind"]], m["colour"], where))
    if len(set(sentences)) != len(sentences):
        return None
    return groups


def is_well_formed(text: str) -> bool:
    return parse_caption(text) is not None


def well_formed_share(texts: Iterable[str]) -> float:
    """Share of captions that are well-formed (0.0 for none)."""
    texts = list(texts)
    return sum(is_well_formed(t) for t in texts) / len(texts) if texts else 0.0
