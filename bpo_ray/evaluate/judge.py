"""Talking to the judge: request/parse protocols per benchmark and the OpenAI-compatible client.

The judge is whatever sits behind the judge proxy's ``/judge/v1`` (GPT-4 in the paper, any
OpenAI-compatible upstream otherwise), reached with ``bpo_ray.serving.judge.client``. The bearer
token comes from the environment only (``BPO_JUDGE_TOKEN``); it travels to the Ray actors wrapped
in ``Secret`` so no repr, log line or exception message can print it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

MODEL_TOKEN_ENV = "BPO_MODEL_TOKEN"


class Secret:
    """A string that never shows itself in repr/str (tokens travel to Ray actors inside one)."""

    __slots__ = ("_value",)

    def __init__(self, value: Optional[str]):
        self._value = value or ""

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret(****)" if self._value else "Secret(<empty>)"

    __str__ = __repr__


def secret_from_env(name: str) -> Secret:
    return Secret(os.environ.get(name))


@dataclass(frozen=True)
class JudgeRequest:
    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float = 0.0
    seed: Optional[int] = 0  # fixed: same request, same reply, and the judge proxy can cache it


@dataclass(frozen=True)
class JudgeProtocol:
    """How one benchmark asks the judge and reads the reply.

    ``build(row, attempt)`` makes the request for attempt 0, 1, ...; ``parse(text)`` returns a
    JSON-able value or ``None`` when the reply is unusable, which triggers the next attempt. When
    ``attempts`` run out, ``fallback`` (if set) supplies the value the official protocol uses
    (MM-Vet: 0.0); otherwise the item is recorded as a judge failure.
    """

    build: Callable[[Mapping[str, Any], int], JudgeRequest]
    parse: Callable[[str], Any]
    attempts: int = 1
    fallback: Optional[Callable[[], Any]] = None
    name: str = field(default="")


def model_client(base_url: str, token: Secret, timeout_s: float, max_retries: int):
    """The official ``openai`` client for the served model under evaluation (the judge is reached
    with the project's one judge client, ``bpo_ray.serving.judge.client``)."""
    from openai import OpenAI

    return OpenAI(base_url=base_url.rstrip("/"), api_key=token.get() or "EMPTY",
                  timeout=timeout_s, max_retries=max_retries)


def error_reason(exc: BaseException) -> str:
    """A short, countable label for a failed request (never includes headers or tokens)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason
    return type(exc).__name__
