"""The one interface every model backend implements, and helpers they share.

A backend owns a base model plus named LoRA adapters and answers ``ChatInput``s; the HTTP layer
never sees which engine runs underneath. ``generate_batch`` lets a backend run several requests
in one forward pass (Serve's ``@serve.batch`` collects them); ``stream`` yields text deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Optional, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()


@dataclass
class ChatInput:
    """A request the backends can run: prompt text, at most one RGB image, sampling settings."""

    model: str                      # the served model name the client asked for
    adapter: Optional[str]          # LoRA adapter name, None for the base model
    prompt: str                     # LLaVA-1.5 prompt; holds one ``<image>`` iff ``image`` is set
    image: Optional[np.ndarray]     # (H, W, 3) uint8
    sampling: SamplingSpec
    prompt_tokens: int              # image tokens included


@dataclass
class GenerationResult:
    text: str
    finish_reason: str          # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class TextDelta:
    text: str
    finish_reason: Optional[str] = None     # set on the last delta
    completion_tokens: int = 0              # running total
    prompt_tokens: int = 0


class GenerationBackend(Protocol):
    """What ``ModelServer`` replicas and the standalone server call."""

    wants_batching: bool

    def model_names(self) -> list[str]: ...

    async def generate_batch(self, inputs: Sequence[ChatInput]) -> list[GenerationResult]: ...

    def stream(self, inp: ChatInput) -> AsyncIterator[TextDelta]: ...

    def close(self) -> None: ...


class StopTrimmer:
    """Cut streamed text at the first stop string, holding back text that may begin one.

    OpenAI semantics: the stop string itself is not returned. ``push`` returns text safe to emit
    now; ``stopped`` says a stop string was hit (the caller ends generation).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        keep = min(self.hold, len(self.buffer))
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class IncrementalDecoder:
    """Text deltas of a growing token sequence, defined as ``decode(all ids)`` so every backend
    returns exactly what a one-shot ``tokenizer.decode`` gives (a trailing half of a multi-byte
    character is held back until the next token completes it, or until ``finish``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def _emit(self, text: str) -> str:
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._emit(text)

    def finish(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))


def trim_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found."""
    trimmer = StopTrimmer(stops)
    out = trimmer.push(text) + trimmer.flush()
    return out, trimmer.stopped


async def generate_via_stream(backend: GenerationBackend, inp: ChatInput) -> GenerationResult:
    """Run one request through ``stream`` and collect the whole answer."""
    parts, last = [], TextDelta("")
    async for delta in backend.stream(inp):
        parts.append(delta.text)
        last = delta
    return GenerationResult("".join(parts), last.finish_reason or "stop", last.prompt_tokens or inp.prompt_tokens,
                            last.completion_tokens)
