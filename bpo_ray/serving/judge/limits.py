"""Per-client request rate limit (sliding one-minute window)."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Callable, Optional


class SlidingWindowLimiter:
    """At most ``per_minute`` admitted requests per client in any 60 s window."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[str, deque] = defaultdict(deque)

    def admit(self, client: str) -> Optional[float]:
        """None if admitted (and counted); else seconds until the client may retry."""
        now = self.clock()
        window = self._seen[client]
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= self.per_minute:
            return max(0.0, 60.0 - (now - window[0]))
        window.append(now)
        return None
