"""COCO object matching exactly as Rohrbach et al.'s CHAIR reference does it.

Reference: ``utils/chair.py`` of https://github.com/LisaAnne/Hallucination (Rohrbach, Hendricks,
Burns, Darrell, Saenko, "Object Hallucination in Image Captioning", EMNLP 2018), which

1. lower-cases the caption and splits it with ``nltk.word_tokenize`` (NLTK 3.2.5: Punkt sentences,
   then the Penn Treebank word rules);
2. singularizes every token with ``pattern.en.singularize`` (Pattern 3.6);
3. joins listed two-word phrases, left to right, one pair at a time ("hot dog", "train track"),
   and maps qualified animals and vehicles to the animal or vehicle ("baby bird" -> "bird",
   "passenger jet" -> "jet", "toilet seat" -> "toilet", "bow tie" -> "tie");
4. drops every "seat" from a caption that also names a toilet;
5. keeps the tokens that are one of the ``synonyms.txt`` forms and maps each to its line's first
   entry, the canonical COCO object.

This module writes those steps itself (it copies no reference code) so its output equals the
reference's token for token. The reference has mechanical defects; ``mode="rohrbach"`` keeps them,
so numbers compare with published CHAIR tables, and ``mode="corrected"`` fixes them:

* the singularizer breaks words that are already singular: "bus" -> "bu", "minibus" -> "minibu",
  "tennis" -> "tenni", "glass" -> "glas" (the reference patches only "wine glas"); it turns "ties"
  into "ty" (Pattern's "^tie" exception is compared literally, caret included) and leaves
  "doggies" plural. *Corrected*: a token that is itself a vocabulary form, or a regular or
  irregular plural of one (``bpo_ray.metrics.chair.plural_forms``), is kept as that form;
* ``synonyms.txt`` is split on ", " without stripping, so " motor bike" and " cheesecake" (two
  spaces after the comma in the file) never match. *Corrected*: forms are stripped;
* the form "iPhone" is never matched against the lower-cased caption. *Corrected*: forms are
  lower-cased.

Deliberate rules are kept in both modes: the qualifier pairs above, "train track(s)" and "home
plate" being no object, the toilet-seat rule, "baby"/"adult"/"passenger" alone being a person,
irregular plurals through the singularizer ("policemen", "gentlemen", "grandchildren" -> person).
Neither mode detects negation ("no dog" still mentions a dog), as in the paper.

Known approximations (they cannot change which vocabulary words are found in ordinary text):
Punkt's trained English model is not installable here, so sentences end at ".", "?" or "!" followed
by white space, as an untrained Punkt splits them (the trained model additionally knows
abbreviations such as "mr." and "e.g."); NLTK's MacIntyre contractions ("gonna", "cannot") are not
split, since none of their parts is a COCO word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

from bpo_ray.metrics.chair import ObjectMention, plural_forms

RohrbachMode = Literal["rohrbach", "corrected"]
ROHRBACH_MODES: tuple[str, ...] = ("rohrbach", "corrected")

# ---------------------------------------------------------------------------------------------
# Tokenizer: NLTK 3.2.5 ``word_tokenize`` behaviour (Punkt sentence split + Treebank word rules)

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_Rule = tuple[re.Pattern[str], str]


def _rules(pairs: Iterable[tuple[str, str]]) -> list[_Rule]:
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


# Each rule is (pattern, replacement), applied in order to one sentence, as the Penn Treebank
# tokenizer of NLTK 3.2.5 applies its STARTING_QUOTES, PUNCTUATION, PARENS_BRACKETS, DOUBLE_DASHES
# and ENDING_QUOTES tables. Only the final period of a sentence is split off.
_BEFORE_PADDING = _rules([
    (r'^"', "``"), (r"(``)", r" \1 "), (r'([ (\[{<])"', r"\1 `` "),
    (r"([:,])([^\d])", r" \1 \2"), (r"([:,])$", r" \1 "), (r"\.\.\.", " ... "), (r"[;@#$%&]", r" \g<0> "),
    (r"([^\.])(\.)([\]\)}>\"']*)\s*$", r"\1 \2\3 "), (r"[?!]", r" \g<0> "), (r"([^'])' ", r"\1 ' "),
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "), (r"--", " -- "),
])
_AFTER_PADDING = _rules([
    (r'"', " '' "), (r"(\S)('')", r"\1 \2 "), (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
])


def treebank_tokenize(text: str) -> list[str]:
    """Tokens as ``nltk.word_tokenize`` (NLTK 3.2.5) gives them for caption-like English text."""
    tokens: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        for pattern, replacement in _BEFORE_PADDING:
            sentence = pattern.sub(replacement, sentence)
        sentence = f" {sentence} "
        for pattern, replacement in _AFTER_PADDING:
            sentence = pattern.sub(replacement, sentence)
        tokens.extend(sentence.split())
    return tokens


# ---------------------------------------------------------------------------------------------
# Singularizer: Pattern 3.6 ``pattern.en.singularize`` (BSD licence, CLiPS, University of Antwerp)

_COMPOUND_LINKS = frozenset(
    "about above across after among around at athwart before behind below beneath beside besides between "
    "betwixt beyond but by during except for from in into near of off on onto out over since till to under "
    "until unto upon with".split()
)
# Words returned unchanged; Pattern tests whether the listed word *ends with* the input, so any
# tail of one of them ("is" of "chassis", "ice" of "advice") is also returned unchanged.
_UNCHANGED = (
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks "
    "proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder "
    "jackanapes scissors christmas gallows mackerel series clippers georgia measles shears cod graffiti mews "
    "species contretemps mumps swine corps news swiss "
    "advice equipment happiness luggage software bread fruit information mathematics progress understanding "
    "butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice electricity gravel "
    "love mustard sand"
).split()
# Plurals of these -ie nouns are returned as they are (still plural). "^pie" and "^tie" carry a
# caret that Pattern compares literally, so "pies" and "ties" fall through to the -ies rule.
_IE_NOUNS = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie "
    "oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie laddie pixie techie bombie "
    "groupie laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie meanie rookie valkyrie"
).split()
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}
# Suffix rules, first match wins; groups that did not take part are dropped from the replacement.
_SUFFIX_RULES = _rules([
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"), (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"), (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"), (r"(?i)s$", ""),
])


def pattern_singularize(word: str) -> str:
    """Singular of ``word`` as Pattern 3.6's ``singularize`` returns it, defects included."""
    if "-" in word:
        head, *rest = word.split("-")
        if rest and rest[0] in _COMPOUND_LINKS:
            return "-".join([pattern_singularize(head), *rest])
    if word.endswith("'"):
        return pattern_singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(unchanged.endswith(lower) for unchanged in _UNCHANGED):
        return word
    if any(lower.endswith(noun + "s") for noun in _IE_NOUNS):
        return lower
    for plural, singular in _IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub(f"(?i){plural}$", singular, word)
    for pattern, replacement in _SUFFIX_RULES:
        match = pattern.search(word)
        if match:
            for number, group in enumerate(match.groups(), start=1):
                if group is None:
                    replacement = replacement.replace(f"\\{number}", "")
            return pattern.sub(replacement, word)
    return word


# ---------------------------------------------------------------------------------------------
# Rohrbach's COCO rules

COCO_DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
"""Two-word phrases read as one word (a phrase that is no COCO form, such as "train track" or
"home plate", thereby hides its parts: a train track is not a train)."""
QUALIFIED_ANIMALS: tuple[str, ...] = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                                      "giraffe", "animal", "cub")
"""After "baby" or "adult" these are the animal, not a person."""
QUALIFIED_VEHICLES: tuple[str, ...] = ("jet", "train")
"""After "passenger" these are the vehicle, not a person."""


def merge_two_word_objects(words: list[str], pairs: dict[str, str]) -> tuple[list[str], list[int]]:
    """Rohrbach's two-word pass (Object HalBench's too): a bigram in ``pairs`` becomes one word.
    Returns the merged words and, per merged word, the index in ``words`` where it starts."""
    merged: list[str] = []
    starts: list[int] = []
    i = 0
    while i < len(words):
        starts.append(i)
        pair = " ".join(words[i:i + 2])
        if pair in pairs:
            merged.append(pairs[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    return merged, starts


def rohrbach_pairs() -> dict[str, str]:
    """Two-token phrase -> the word it is read as (Rohrbach et al.'s ``double_word_dict``)."""
    pairs = {phrase: phrase for phrase in COCO_DOUBLE_WORDS}
    for animal in QUALIFIED_ANIMALS:
        pairs[f"baby {animal}"] = pairs[f"adult {animal}"] = animal
    for vehicle in QUALIFIED_VEHICLES:
        pairs[f"passenger {vehicle}"] = vehicle
    pairs.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return pairs


def rohrbach_synonyms(lines: Iterable[str], mode: RohrbachMode = "rohrbach") -> dict[str, str]:
    """Form -> canonical object from ``synonyms.txt`` lines ('canonical, synonym, ...').

    ``rohrbach``: each line is stripped and split on ", " exactly as the reference does, so forms
    keep stray spaces and capitals; a form listed on two lines belongs to the later one.
    ``corrected``: forms are also stripped and lower-cased, and empty ones dropped.
    """
    if mode not in ROHRBACH_MODES:
        raise ValueError(f"unknown CHAIR mode {mode!r}; choose from {ROHRBACH_MODES}")
    synonyms: dict[str, str] = {}
    for line in lines:
        forms = line.strip().split(", ")
        if mode == "corrected":
            forms = [form.strip().lower() for form in forms if form.strip()]
        if not forms or forms == [""]:
            continue
        for form in forms:
            synonyms[form] = forms[0]
    return synonyms


@dataclass(frozen=True)
class RohrbachWords:
    """One caption as the reference sees it: ``words`` the matched forms, ``objects`` their
    canonical objects, ``positions`` their indices in ``tokens`` (the caption after pairing)."""

    words: list[str]
    objects: list[str]
    positions: list[int]
    tokens: list[str]


class RohrbachExtractor:
    """Object mentions in a caption by Rohrbach et al.'s rules; the interface of
    ``bpo_ray.metrics.chair.ObjectMentionExtractor`` (``extract``, ``canonical``)."""

    def __init__(self, synonym_lines: Iterable[str], mode: RohrbachMode = "rohrbach"):
        self.mode = mode
        self.synonyms = rohrbach_synonyms(synonym_lines, mode)
        self.pairs = rohrbach_pairs()
        self._plural_of: dict[str, str] = {}
        if mode == "corrected":
            for form in self.synonyms:
                words = form.split(" ")
                for plural in plural_forms(words[-1]):
                    self._plural_of.setdefault(" ".join([*words[:-1], plural]), form)

    def singular(self, token: str) -> str:
        """A token's singular: Pattern's in ``rohrbach`` mode; in ``corrected`` mode a vocabulary
        form or a plural of one is kept or mapped first ("bus", "buses" -> "bus", "ties" -> "tie")."""
        if self.mode == "corrected":
            if token in self.synonyms:
                return token
            if token in self._plural_of:
                return self._plural_of[token]
        return pattern_singularize(token)

    def caption_words(self, caption: str) -> RohrbachWords:
        """The reference's ``caption_to_words``: tokens, singulars, pairs, toilet rule, lookup."""
        tokens = [self.singular(token) for token in treebank_tokenize(caption.lower())]
        paired, starts = merge_two_word_objects(tokens, self.pairs)
        # A toilet's seat is the toilet. The reference then indexes the positions of the unfiltered
        # list by rank in the filtered one, which we keep.
        filtered = paired
        if "toilet" in paired and "seat" in paired:
            filtered = [word for word in paired if word != "seat"]
        kept = [(rank, word) for rank, word in enumerate(filtered) if word in self.synonyms]
        words = [word for _, word in kept]
        return RohrbachWords(words, [self.synonyms[w] for w in words], [starts[rank] for rank, _ in kept], paired)

    def extract(self, text: str) -> list[ObjectMention]:
        found = self.caption_words(text)
        return [ObjectMention(word, obj, pos) for word, obj, pos in zip(found.words, found.objects, found.positions)]

    def canonical(self, name: str) -> str:
        """Canonical object of a form ('dog' for 'puppy'); unknown names are returned unchanged."""
        return self.synonyms.get(name, self.synonyms.get(name.lower(), name))

