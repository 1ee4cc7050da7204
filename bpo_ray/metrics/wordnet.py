"""Noun lemmas as NLTK's ``WordNetLemmatizer().lemmatize(word)`` gives them (WordNet's morphy).

Object HalBench (RLHF-V / RLAIF-V ``eval/eval_gpt_obj_halbench.py``) and AMBER (``inference.py``)
lemmatize with NLTK's WordNet lemmatizer, noun part of speech. That is WordNet's morphy (WordNet
3.0 ``morphy(7WN)``) as NLTK implements it (``WordNetCorpusReader._morphy``, NLTK 3.8.1):

1. a word listed in ``noun.exc`` gives itself and its listed base forms;
2. otherwise the word and the results of one pass of the detachment rules (``-s``, ``-ses``,
   ``-ves``, ``-xes``, ``-zes``, ``-ches``, ``-shes``, ``-men``, ``-ies``); if none is a noun in
   ``index.noun``, the rules are applied again to the results until one is or none remains;
3. of the candidates that are nouns in ``index.noun`` (in that order), the shortest wins, the
   first of equal lengths ("men" -> "men", since "men" is itself a noun); no candidate: the word.

This module reads the two WordNet database files itself (no NLTK, no download): point it at a
WordNet 3.0 ``dict`` directory (Debian's ``wordnet-base`` installs one at /usr/share/wordnet; an
``nltk_data/corpora/wordnet`` directory has the same files).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from bpo_ray import storage

NOUN_RULES: tuple[tuple[str, str], ...] = (
    ("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"),
    ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y"),
)
DEFAULT_WORDNET_DIRS: tuple[str, ...] = ("/usr/share/wordnet", "~/nltk_data/corpora/wordnet",
                                         "/usr/share/nltk_data/corpora/wordnet", "/usr/local/share/nltk_data/corpora/wordnet")


class WordNetMissing(FileNotFoundError):
    """No WordNet database where one was looked for."""


class NounLemmatizer:
    """``lemmatize(word)`` = NLTK's ``WordNetLemmatizer().lemmatize(word)`` (pos "n")."""

    def __init__(self, nouns: Iterable[str], exceptions: dict[str, list[str]]):
        self.nouns = frozenset(nouns)
        self.exceptions = dict(exceptions)
        self._cache: dict[str, str] = {}

    @classmethod
    def from_dir(cls, directory: Optional[str] = None) -> "NounLemmatizer":
        """Read ``index.noun`` and ``noun.exc`` from ``directory`` (local or s3://), or from the
        first of ``DEFAULT_WORDNET_DIRS`` that has them."""
        candidates = [directory] if directory else [os.path.expanduser(d) for d in DEFAULT_WORDNET_DIRS]
        for base in candidates:
            index, exc = storage.join(base, "index.noun"), storage.join(base, "noun.exc")
            if storage.exists(index) and storage.exists(exc):
                return cls(_index_lemmas(storage.read_text(index)), _exception_map(storage.read_text(exc)))
        raise WordNetMissing(
            f"no WordNet 3.0 database (index.noun + noun.exc) in {', '.join(candidates)}: install Debian's "
            "wordnet-base or NLTK's wordnet data and point evaluate.<bench>.wordnet at its directory")

    def _filter(self, forms: Iterable[str]) -> list[str]:
        seen: list[str] = []
        for form in forms:
            if form in self.nouns and form not in seen:
                seen.append(form)
        return seen

    def candidates(self, word: str) -> list[str]:
        """Morphy's noun base forms of ``word``, in NLTK's order."""
        if word in self.exceptions:
            return self._filter([word] + self.exceptions[word])
        forms = _detach([word])
        found = self._filter([word] + forms)
        while not found and forms:
            forms = _detach(forms)
            found = self._filter(forms)
        return found

    def lemmatize(self, word: str) -> str:
        if word not in self._cache:
            found = self.candidates(word)
            self._cache[word] = min(found, key=len) if found else word
        return self._cache[word]


def _detach(forms: list[str]) -> list[str]:
    return [form[: -len(old)] + new for form in forms for old, new in NOUN_RULES if form.endswith(old)]


def _index_lemmas(text: str) -> set[str]:
    """Lemmas of ``index.noun``: the first field of each line (the licence header lines start with
    spaces)."""
    return {line.split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith(" ")}


def _exception_map(text: str) -> dict[str, list[str]]:
    """``noun.exc``: "inflected base [base ...]" per line."""
    exceptions: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if fields:
            exceptions[fields[0]] = fields[1:]
    return exceptions
