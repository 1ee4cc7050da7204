"""The closed vocabulary of the bias world: object kinds, colours, counts, positions, synonyms.

Object kinds come in *prior pairs* (cup/saucer, fork/knife, ...): the text corpus mentions the two
together almost always, the rendered scenes place them independently. A language model trained on
the corpus therefore "expects" a saucer next to every cup, which is the language prior that object
hallucination comes from (BPO paper, Sec. 1; Rohrbach et al. 2018 on co-occurrence driven
hallucination). Each kind also has a distinct Pillow-drawable shape so a tiny vision encoder can
tell kinds apart; the colour is the fill.
"""

from __future__ import annotations

PRIOR_PAIRS: tuple[tuple[str, str], ...] = (
    ("cup", "saucer"),
    ("fork", "knife"),
    ("dog", "leash"),
    ("toothbrush", "toothpaste"),
    ("keyboard", "mouse"),
    ("pen", "paper"),
    ("key", "lock"),
)
"""Pairs that co-occur in the text corpus (both directions) but not in the scenes."""

OBJECT_KINDS: tuple[str, ...] = tuple(kind for pair in PRIOR_PAIRS for kind in pair)

SHAPE_OF_KIND: dict[str, str] = {
    "cup": "disc",
    "saucer": "flat_bar",
    "fork": "tall_bar",
    "knife": "diagonal",
    "dog": "square",
    "leash": "ring",
    "toothbrush": "plus",
    "toothpaste": "triangle_up",
    "keyboard": "hollow_square",
    "mouse": "triangle_down",
    "pen": "diamond",
    "paper": "cross",
    "key": "half_disc",
    "lock": "tee",
}
"""Pillow shape drawn for each kind; ``bpo_ray.world.scenes.render_scene`` knows how to draw them."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
"""Colour name -> RGB fill. Chosen far apart in hue so 32x32 renders keep them distinguishable."""

BACKGROUND_RGB: tuple[int, int, int] = (245, 245, 245)

COUNTS: tuple[int, ...] = (1, 2, 3)
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
"""Cells of a 3x3 grid in reading order; index i is row i // 3, column i % 3."""

POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}

PLURALS: dict[str, str] = {
    "cup": "cups",
    "saucer": "saucers",
    "fork": "forks",
    "knife": "knives",
    "dog": "dogs",
    "leash": "leashes",
    "toothbrush": "toothbrushes",
    "toothpaste": "toothpastes",
    "keyboard": "keyboards",
    "mouse": "mice",
    "pen": "pens",
    "paper": "papers",
    "key": "keys",
    "lock": "locks",
}
"""Plural used when the world *writes* text; the CHAIR extractor derives its own plural forms."""

SYNONYMS: dict[str, str] = {
    # surface form -> canonical kind; canonical names map to themselves.
    **{kind: kind for kind in OBJECT_KINDS},
    "mug": "cup", "teacup": "cup", "coffee cup": "cup",
    "small plate": "saucer", "tea plate": "saucer",
    "table fork": "fork", "dinner fork": "fork",
    "table knife": "knife", "butter knife": "knife", "blade": "knife",
    "puppy": "dog", "doggy": "dog", "hound": "dog", "pup": "dog",
    "dog leash": "leash",
    "tooth brush": "toothbrush",
    "tooth paste": "toothpaste", "tube of toothpaste": "toothpaste",
    "computer keyboard": "keyboard", "keypad": "keyboard",
    "computer mouse": "mouse",
    "ballpoint": "pen", "ballpoint pen": "pen", "biro": "pen",
    "sheet of paper": "paper", "sheet": "paper", "page": "paper", "notepaper": "paper",
    "door key": "key",
    "padlock": "lock",
}
"""Plain ``dict[str, str]`` so the CHAIR scorer can take COCO's 80-class synonym table the same way.

Multi-word forms beat their last word ("dog leash" is a leash, not a dog) because the extractor
matches longest-first.
"""


def prior_partners() -> dict[str, str]:
    """Each kind -> its prior-typical partner (symmetric over ``PRIOR_PAIRS``)."""
    partners: dict[str, str] = {}
    for first, second in PRIOR_PAIRS:
        partners[first] = second
        partners[second] = first
    return partners


def plural_of(kind: str) -> str:
    """The plural the world writes for ``kind`` ("mouse" -> "mice")."""
    return PLURALS[kind]


def indefinite_article(word: str) -> str:
    """'a' or 'an' by the first letter; good enough for this vocabulary and COCO's."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def existence_answer(kind: str, present: bool) -> str:
    """The world's answer to "Is there a <kind> in the image?": ``"The cup yes."`` / ``"The cup no."``.

    The answer names the object, and the decision is the very next token, so one attention step
    from the object word to the image tokens can decide it. A tiny LM does not learn the two-step
    circuit (carry the asked word forward, then look it up) within the alignment budget: trained
    to answer a bare "Yes."/"No." (or "The cup: yes.") it answers at chance.
    Both POPE parses read it: the official rule (``parse_pope_official``: "no" only for the word
    "no") and the strict one (``parse_yes_no``: the first yes/no word).
    """
    return f"The {kind} {'yes' if present else 'no'}."


def flip_existence_answer(answer: str) -> str:
    """The opposite decision for an answer made by ``existence_answer``."""
    head, _, decision = answer.rstrip(".").rpartition(" ")
    return f"{head} {'no' if decision == 'yes' else 'yes'}."
