"""``Server-Timing`` on every response: how long the app itself took, apart from the network and
any proxy in front of it (Serve's HTTP proxy, HAProxy).

    Server-Timing: app;dur=0.41        # milliseconds, from the ASGI call to the response headers

The span starts when the ASGI app is called (routing, reading the body, auth, the handler and
rendering the response body all count) and ends when the response headers are sent. Clients and
benchmarks read it to tell server-side time from the hop in front (``bench/serve.py``).
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, MutableMapping

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADER = b"server-timing"


def server_ms(header_value: str | None, metric: str = "app") -> float | None:
    """The ``dur`` of ``metric`` in a ``Server-Timing`` header value (None if absent)."""
    for entry in (header_value or "").split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        if name == metric:
            for param in params:
                key, _, value = param.partition("=")
                if key == "dur":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


class ServerTimingMiddleware:
    """Pure ASGI middleware (no per-request objects beyond a closure): adds ``Server-Timing``."""

    def __init__(self, app: ASGIApp, metric: str = "app"):
        self.app = app
        self.prefix = f"{metric};dur=".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                dur = (time.perf_counter() - start) * 1000.0
                message["headers"] = [*message.get("headers", ()), (HEADER, self.prefix + f"{dur:.3f}".encode())]
            await send(message)

        await self.app(scope, receive, timed_send)
