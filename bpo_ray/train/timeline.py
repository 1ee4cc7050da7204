"""Where a run's wall time goes: named phases with wall-clock start and end, in every process.

Each process (the driver, each Ray Train worker, each reference scorer) keeps a ``Timeline`` and
wraps its phases in ``timeline.phase(name)``. Times are ``time.time()`` (seconds since the epoch),
so phases of different processes on one machine line up, and the gaps between them (the driver
calling ``TorchTrainer.fit`` until the worker's loop starts, the loop returning until ``fit``
returns) are measured too. The train manifest's ``timings`` holds them as flat ``<name>_s``
durations (``phase_seconds``); ``bench/train.py --phases`` prints them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional


@dataclass
class Timeline:
    """Phases of one process: ``(name, start, end)`` in ``time.time()`` seconds."""

    phases: list[tuple[str, float, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as ``name`` (recorded even when the block raises)."""
        start = time.time()
        try:
            yield
        finally:
            self.phases.append((name, start, time.time()))

    def add(self, name: str, start: float, end: Optional[float] = None) -> None:
        """Record a phase measured elsewhere (e.g. a process's creation time up to now)."""
        self.phases.append((name, start, time.time() if end is None else end))

    def start_of(self, name: str) -> Optional[float]:
        return next((s for n, s, _ in self.phases if n == name), None)

    def end_of(self, name: str) -> Optional[float]:
        return next((e for n, _, e in reversed(self.phases) if n == name), None)

    def to_json(self) -> list[list]:
        return [[n, s, e] for n, s, e in self.phases]

    @classmethod
    def from_json(cls, data: Optional[list]) -> "Timeline":
        return cls([(str(n), float(s), float(e)) for n, s, e in (data or [])])


def phase_seconds(timeline: Timeline, prefix: str = "") -> dict[str, float]:
    """``{prefix + name + "_s": seconds}`` (a name timed more than once: the sum)."""
    out: dict[str, float] = {}
    for name, start, end in timeline.phases:
        key = f"{prefix}{name}_s"
        out[key] = round(out.get(key, 0.0) + (end - start), 3)
    return out


def process_start_time() -> Optional[float]:
    """When this process was created (``time.time()`` seconds), or None where it cannot be read."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # psutil missing or /proc unreadable: the phase is simply not reported
        return None
