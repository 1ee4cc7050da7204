"""``nltk.word_tokenize`` as NLTK 3.8.1 behaves on lower-cased answers (RLAIF-V pins NLTK 3.8.1).

Two steps, as ``word_tokenize`` takes them:

* sentences: Punkt (Kiss & Strunk 2006) without a trained model (the trained English pickle cannot
  be downloaded here; see tests/fixtures/parity/README.md). It breaks after ".", "?" or "!" before
  white space, except after an ellipsis ("glasses... and") and after a number or a single letter
  with a period ("1.", "a.") when the next token starts lower-case or is punctuation: the
  orthographic heuristic of Punkt's second pass. The trained model also knows abbreviations
  ("mr.", "e.g."); lower-cased answers rarely contain them;
* words: the rules of ``NLTKWordTokenizer`` (NLTK 3.8.1), which differs from the 3.2.5 Treebank
  rules of ``bpo_ray.eval.rohrbach`` in Unicode quotes ("woman’s" -> "woman", "’", "s"), runs of
  two or more dots, "*" and single quotes before a word. MacIntyre contractions ("gonna",
  "cannot") are not split: none of their parts is a COCO object word.

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
_CLOSERS = "\"')]}»”’"  # may follow the sentence-final mark
_NUMBER = re.compile(r"-?[\.,]?\d[\d,\.-]*")
_INITIAL = re.compile(r"[^\W\d]")


def _keeps_sentence(token: str, following: str) -> bool:
    """Punkt's second pass without trained parameters: no break after this period-final token."""
    if token.endswith(".."):
        return True
    if token.endswith(".") and (_NUMBER.fullmatch(token[:-1]) or _INITIAL.fullmatch(token[:-1])):
        return following[0].islower() or following[0] in ";:,.!?"
    return False


def punkt_sentences(text: str) -> list[str]:
    """Sentences of ``text`` as an untrained ``PunktSentenceTokenizer`` splits lower-cased text."""
    tokens = list(re.finditer(r"\S+", text))
    sentences: list[str] = []
    start = 0
    for current, following in zip(tokens, tokens[1:]):
        word = current.group().rstrip(_CLOSERS)
        if word and word[-1] in ".?!" and not _keeps_sentence(word, following.group()):
            sentences.append(text[start:current.end()].strip())
            start = following.start()
    tail = text[start:].strip()
    return sentences + ([tail] if tail else [])


def word_tokenize(text: str) -> list[str]:
    """Tokens as NLTK 3.8.1's ``word_tokenize`` gives them for a lower-cased answer."""
    tokens: list[str] = []
    for sentence in punkt_sentences(text):
        for pattern, replacement in _STARTING_QUOTES + _PUNCTUATION:
            sentence = pattern.sub(replacement, sentence)
        sentence = f" {sentence} "
        for pattern, replacement in _ENDING_QUOTES:
            sentence = pattern.sub(replacement, sentence)
        tokens.extend(sentence.split())
    return tokens
