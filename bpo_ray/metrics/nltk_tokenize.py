"""``nltk.word_tokenize`` as NLTK 3.8.1 behaves (RLAIF-V pins NLTK 3.8.1; AMBER uses it too).

Two steps, as ``word_tokenize`` takes them:

* sentences: Punkt (Kiss & Strunk 2006) without a trained model (the trained English pickle cannot
  be downloaded here; see tests/fixtures/parity/README.md). It breaks after ".", "?" or "!"
  followed by white space or punctuation ("cooked.\"next" breaks before the quote), except after an
  ellipsis ("glasses... and") and after a number or a single letter with a period ("1.", "a.")
  when the next token starts lower-case or is punctuation: the orthographic heuristic of Punkt's
  second pass. Closing quotes/brackets followed by white space stay with the sentence they close.
  The trained model also knows abbreviations ("mr.", "e.g."); lower-cased answers rarely contain
  them;
* words: the rules of ``NLTKWordTokenizer`` (NLTK 3.8.1), which differs from the 3.2.5 Treebank
  rules of ``bpo_ray.metrics.rohrbach`` in Unicode quotes ("woman’s" -> "woman", "’", "s"), runs of
  two or more dots, "*", single quotes before a word, and MacIntyre's contractions ("cannot" ->
  "can", "not"), which shift token positions.

The rules are written here from NLTK's documented behaviour and checked token for token against
NLTK 3.8.1 in tests/test_parity.py.
"""

from __future__ import annotations

import re
from typing import Iterable

_Rule = tuple[re.Pattern[str], str]


def _rules(pairs: Iterable[tuple[str, str]]) -> list[_Rule]:
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


_STARTING_QUOTES = _rules([
    ("([«“‘„]|[`]+)", r" \1 "), (r'^"', "``"), (r"(``)", r" \1 "), (r"([ \(\[{<])(\"|\'{2})", r"\1 `` "),
    (r"(?i)(\')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),
])
_PUNCTUATION = _rules([
    (r'([^\.])(\.)([\]\)}>"\'»”’ ]*)\s*$', r"\1 \2 \3 "), (r"([:,])([^\d])", r" \1 \2"), (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "), (r"[;@#$%&]", r" \g<0> "), (r'([^\.])(\.)([\]\)}>"\']*)\s*$', r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "), (r"([^'])' ", r"\1 ' "), (r"[*]", r" \g<0> "),
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "), (r"--", r" -- "),
])
_ENDING_QUOTES = _rules([
    ("([»”’])", r" \1 "), (r"''", " '' "), (r'"', " '' "), (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
])
_NON_WORD = r"[?!)\";}\]\*:@\'\({\[]"  # Punkt: punctuation that ends a word token
_CANDIDATE = re.compile(r"[.?!](?=(?P<after>" + _NON_WORD + r")|\s+(?P<next>\S+))")
_TOKEN_SPLIT = re.compile(_NON_WORD + r"|\.{2,}|-{2,}")
_REALIGN = re.compile(r"[\"\')\]}]+?(?:\s+|(?=--)|$)")  # closing marks carried back to the sentence
_NUMBER = re.compile(r"-?[\.,]?\d[\d,\.-]*")
_INITIAL = re.compile(r"[^\W\d]")


def _is_break(word: str, mark: str, following: str) -> bool:
    """Does Punkt (no trained parameters) end a sentence at ``mark`` after ``word``?"""
    if mark in "?!":
        return True
    if word.endswith("."):  # an ellipsis: never a break without a trained orthographic context
        return False
    # Punkt's last word token: after the last punctuation that ends a token ("'", "?", "!" also
    # start the next one: "hasn't." ends in the token "'t.", which is no initial)
    splits = list(_TOKEN_SPLIT.finditer(word))
    core = word
    if splits:
        last = splits[-1]
        core = word[last.start():] if last.group() in ("'", "?", "!") else word[last.end():]
    # Punkt's orthographic heuristic: a lower-case or punctuation token next makes a number or an
    # initial no break; an initial before an upper-case token is taken for an abbreviation too
    ortho_no_break = following[0].islower() or following[0] in ";:,.!?"
    if _NUMBER.fullmatch(core):
        return not ortho_no_break
    if _INITIAL.fullmatch(core):
        return not (ortho_no_break or following[0].isupper())
    return True


def punkt_sentences(text: str) -> list[str]:
    """Sentences of ``text`` as an untrained ``PunktSentenceTokenizer`` splits them:
    candidates are ".", "?", "!" before punctuation or white space (the last one of a word),
    decided by ``_is_break``; closing quotes and brackets followed by white space are carried back
    to the sentence they close."""
    candidates = list(_CANDIDATE.finditer(text))
    spans: list[tuple[int, int]] = []
    last_break = 0
    for i, match in enumerate(candidates):
        if i + 1 < len(candidates) and not any(c.isspace() for c in text[match.start():candidates[i + 1].start()]):
            continue  # a later mark in the same word is the candidate
        word_start = max(text.rfind(c, 0, match.start()) for c in " \t\n\r\f\v") + 1
        following = match.group("after") or match.group("next")
        if not _is_break(text[word_start:match.start()], match.group(), following):
            continue
        end = match.end()
        next_start = match.start("next") if match.group("next") else match.end()
        closing = _REALIGN.match(text, next_start)
        if closing:
            end, next_start = next_start + len(closing.group().rstrip()), closing.end()
        spans.append((last_break, end))
        last_break = next_start
    spans.append((last_break, len(text.rstrip())))
    return [text[a:b] for a, b in spans if text[a:b]]


_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
    r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
    r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b",
)]


def word_tokenize(text: str) -> list[str]:
    """Tokens as NLTK 3.8.1's ``word_tokenize`` gives them (with an untrained Punkt)."""
    tokens: list[str] = []
    for sentence in punkt_sentences(text):
        for pattern, replacement in _STARTING_QUOTES + _PUNCTUATION:
            sentence = pattern.sub(replacement, sentence)
        sentence = f" {sentence} "
        for pattern, replacement in _ENDING_QUOTES:
            sentence = pattern.sub(replacement, sentence)
        for pattern in _CONTRACTIONS:  # MacIntyre's: "cannot" -> "can", "not"
            sentence = pattern.sub(r" \1 \2 ", sentence)
        tokens.extend(sentence.split())
    return tokens
