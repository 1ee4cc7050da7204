"""Forward a chat-completions request to the upstream judge, retrying 429/5xx with backoff.

The upstream key is read from the environment by the proxy process and only ever put in the
``Authorization`` header; upstream error text is redacted before it reaches a client or a log.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import httpx

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 30.0
_KEY_LIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*]{6,}")


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret and anything shaped like an API key replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEY_LIKE.sub("***", text)[:500]


@dataclass
class UpstreamResult:
    status: int                    # HTTP status of the last attempt (0: no response at all)
    body: Optional[dict]           # parsed JSON of the last response
    attempts: int
    error: str = ""                # redacted, safe to show


def _retry_after(resp: httpx.Response) -> Optional[float]:
    value = resp.headers.get("retry-after")
    try:
        return min(MAX_RETRY_AFTER_S, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_text(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        return str(err.get("message") if isinstance(err, dict) else err)
    except Exception:  # noqa: BLE001 - any non-JSON error page
        return resp.text[:200]


class UpstreamClient:
    """POSTs ``{base_url}/chat/completions``; ``complete`` never raises for HTTP or network failures."""

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 0.5, redact_also: Sequence[str] = ()):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.client = httpx.AsyncClient(timeout=timeout_s, headers=headers)
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self._secrets = [api_key, *redact_also]

    async def complete(self, body: dict[str, Any]) -> UpstreamResult:
        attempts, delay = 0, self.backoff_s
        while True:
            attempts += 1
            wait: Optional[float] = None
            try:
                resp = await self.client.post(self.url, json=body)
            except httpx.HTTPError as exc:
                result = UpstreamResult(0, None, attempts, f"upstream unreachable ({type(exc).__name__})")
            else:
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                    except ValueError:
                        data = None
                    if isinstance(data, dict):
                        return UpstreamResult(200, data, attempts)
                    result = UpstreamResult(502, None, attempts, "upstream answered 200 without a JSON object")
                else:
                    result = UpstreamResult(resp.status_code, None, attempts,
                                            redact(f"upstream returned {resp.status_code}: {_error_text(resp)}",
                                                   self._secrets))
                    wait = _retry_after(resp)
            retryable = result.status == 0 or result.status in RETRY_STATUSES
            if not retryable or attempts > self.max_retries:
                return result
            await asyncio.sleep(wait if wait is not None else delay * (1 + 0.1 * random.random()))
            delay *= 2

    async def close(self) -> None:
        await self.client.aclose()
