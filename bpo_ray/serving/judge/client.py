"""Client side of the judge proxy: an ``openai`` client pointed at it, the token from the environment.

The one judge client: the evaluate stage, the judge-ranked and on-policy pair strategies and the
annotation job all use it, with the proxy's own token; none of them ever sees the upstream key.

    client = judge_client("http://127.0.0.1:8000/judge/v1")
    text = judge_complete(client, [{"role": "user", "content": "Rate ..."}], model="gpt-4")
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

CLIENT_TOKEN_ENV = "BPO_JUDGE_TOKEN"


def client_token(token_env: str = CLIENT_TOKEN_ENV, server_tokens_env: str = "BPO_JUDGE_TOKENS") -> str:
    """This client's token: ``$BPO_JUDGE_TOKEN``, else (one machine, demo) the first of the server's list."""
    from bpo_ray.serving.judge.auth import parse_client_tokens

    token = os.environ.get(token_env, "").strip()
    if token:
        return token
    tokens = list(parse_client_tokens(os.environ.get(server_tokens_env, "")))
    if tokens:
        return tokens[0]
    raise RuntimeError(f"no judge token: set ${token_env} (or ${server_tokens_env} on a one-machine setup)")


def judge_client(base_url: str, token: Optional[str] = None, token_env: str = CLIENT_TOKEN_ENV,
                 timeout_s: float = 120.0, max_retries: int = 2):
    """``openai.OpenAI`` for the judge proxy at ``base_url`` (e.g. ``http://127.0.0.1:8000/judge/v1``)."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=token or client_token(token_env), timeout=timeout_s,
                         max_retries=max_retries)


def async_judge_client(base_url: str, token: Optional[str] = None, token_env: str = CLIENT_TOKEN_ENV,
                       timeout_s: float = 120.0, max_retries: int = 2):
    """``openai.AsyncOpenAI`` twin of ``judge_client``."""
    import openai

    return openai.AsyncOpenAI(base_url=base_url, api_key=token or client_token(token_env), timeout=timeout_s,
                              max_retries=max_retries)


def judge_complete(client, messages: Sequence[dict[str, Any]], model: str = "gpt-4", max_tokens: int = 512,
                   temperature: float = 0.0, seed: Optional[int] = 0) -> str:
    """One deterministic judge call (temperature 0 + seed: the proxy answers repeats from its cache)."""
    resp = client.chat.completions.create(model=model, messages=list(messages), max_tokens=max_tokens,
                                          temperature=temperature, seed=seed)
    return resp.choices[0].message.content or ""


def judge_usage(client) -> dict:
    """This client's usage report (``GET {base_url}/usage``)."""
    import httpx

    resp = httpx.get(str(client.base_url).rstrip("/") + "/usage",
                     headers={"Authorization": f"Bearer {client.api_key}"}, timeout=30)
    resp.raise_for_status()
    return resp.json()
