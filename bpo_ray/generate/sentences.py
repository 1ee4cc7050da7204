"""Sentences of an answer and their verdicts: which sentence is the first hallucinated one.

SENTINEL (Peng et al., ICCV 2025, "Mitigating Object Hallucinations via Sentence-Level Early
Intervention") labels a generated description sentence by sentence: a sentence is *hallucinated*
when a verifier says one of the objects it mentions is not in the image, *grounded* when every
object it mentions is confirmed, and carries no information when it mentions no object. The
preference pair is built at the first hallucinated sentence, with the grounded sentences before it
as shared context. RLAIF-V (Yu et al., CVPR 2025) splits a response into atomic claims the same way
("divide and conquer") and scores the whole response by its rejected claims.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from bpo_ray.metrics.chair import MentionExtractor

# A sentence ends at . ! ? (possibly repeated) followed by whitespace or the end of the text.
_SENTENCE = re.compile(r"[^.!?]*(?:[.!?]+|$)")


def split_sentences(text: str) -> list[str]:
    """Non-empty sentences of ``text`` in order, each stripped, with its end punctuation.

    ``" ".join(split_sentences(t))`` equals ``t`` up to whitespace, so a prefix of sentences is a
    prefix of the answer the model generated.
    """
    return [m.group(0).strip() for m in _SENTENCE.finditer(text or "") if m.group(0).strip()]


@dataclass(frozen=True)
class SentenceVerdict:
    """One sentence, the canonical objects it mentions (first mention order) and the verdicts."""

    text: str
    objects: tuple[str, ...]
    present: tuple[bool, ...]  # present[i]: the verifier found objects[i] in the image

    @property
    def hallucinated(self) -> bool:
        return not all(self.present)

    @property
    def grounded_objects(self) -> int:
        return sum(self.present)

    @property
    def hallucinated_objects(self) -> int:
        return len(self.present) - sum(self.present)

    def as_json(self) -> list:
        """``[sentence, [[object, present], ...]]`` for the pair's provenance."""
        return [self.text, [[o, p] for o, p in zip(self.objects, self.present)]]


def mentioned_objects(sentence: str, extractor: MentionExtractor) -> tuple[str, ...]:
    """Distinct canonical objects mentioned in ``sentence``, in order of first mention."""
    return tuple(dict.fromkeys(m.canonical for m in extractor.extract(sentence)))


def complete_sentences(text: str) -> list[str]:
    """``split_sentences`` without a last sentence cut off mid-way (no end punctuation), as an
    answer stopped by ``max_new_tokens`` ends; a one-sentence answer is kept as it is ("One")."""
    sentences = split_sentences(text)
    if len(sentences) > 1 and sentences[-1][-1] not in ".!?":
        sentences = sentences[:-1]
    return sentences


def sentence_objects(text: str, extractor: MentionExtractor) -> list[tuple[str, tuple[str, ...]]]:
    """``[(sentence, objects), ...]`` for every complete sentence of ``text``."""
    return [(s, mentioned_objects(s, extractor)) for s in complete_sentences(text)]


def apply_verdicts(sentences: Sequence[tuple[str, Sequence[str]]], verdicts: Mapping[str, bool]) -> list[SentenceVerdict]:
    """Attach the verifier's ``object -> present`` verdicts to each sentence's objects."""
    missing = sorted({o for _, objs in sentences for o in objs} - set(verdicts))
    if missing:
        raise KeyError(f"no verdict for objects {missing}")
    return [SentenceVerdict(s, tuple(objs), tuple(bool(verdicts[o]) for o in objs)) for s, objs in sentences]


def first_hallucinated(verdicts: Sequence[SentenceVerdict]) -> Optional[int]:
    """Index of the first sentence with an object the verifier rejected, or ``None``."""
    for i, v in enumerate(verdicts):
        if v.hallucinated:
            return i
    return None


def is_grounded_answer(verdicts: Sequence[SentenceVerdict]) -> bool:
    """No rejected object anywhere and at least one confirmed one (an answer that names nothing
    would teach the model to stop describing: recall drops)."""
    return bool(verdicts) and first_hallucinated(verdicts) is None and any(v.grounded_objects for v in verdicts)


def join_sentences(sentences: Sequence[str]) -> str:
    return " ".join(s.strip() for s in sentences if s.strip())
