"""Where a run's wall time goes: named phases with wall-clock start and end, in every process.

Each process (the driver, each Ray Train worker) keeps a ``Timeline`` and wraps its phases in
``timeline.phase(name)``. Times are ``time.time()`` (seconds since the epoch), so phases of
different processes on one machine line up, and the gaps between them (the driver calling
``TorchTrainer.fit`` until the worker's loop starts, the loop returning until ``fit`` returns)
are measured too. Each phase also records the CPU seconds its process spent in it
(``time.process_time``), which a loaded machine does not inflate the way it inflates wall time,
and the process's peak RSS at its end (``ru_maxrss``: which phase raised the peak).
The train manifest's ``timings`` holds the wall times as flat ``<name>_s`` durations
(``phase_seconds``); ``bench/train.py`` prints both.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional


class Phase(NamedTuple):
    name: str
    start: float  # time.time()
    end: float
    cpu_s: Optional[float] = None  # this process's CPU seconds within the phase, where known
    peak_rss_mb: Optional[float] = None  # this process's peak RSS when the phase ended


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Timeline:
    """Phases of one process (or of several, merged with name prefixes)."""

    phases: list[Phase] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as ``name`` (recorded even when the block raises)."""
        start, cpu = time.time(), time.process_time()
        try:
            yield
        finally:
            self.phases.append(Phase(name, start, time.time(), time.process_time() - cpu, peak_rss_mb()))

    def add(self, name: str, start: float, end: Optional[float] = None, cpu_s: Optional[float] = None) -> None:
        """Record a phase measured elsewhere (e.g. from this process's creation up to now)."""
        self.phases.append(Phase(name, start, time.time() if end is None else end, cpu_s, peak_rss_mb()))

    def start_of(self, name: str) -> Optional[float]:
        return next((p.start for p in self.phases if p.name == name), None)

    def end_of(self, name: str) -> Optional[float]:
        return next((p.end for p in reversed(self.phases) if p.name == name), None)

    def prefixed(self, prefix: str) -> "Timeline":
        return Timeline([p._replace(name=prefix + p.name) for p in self.phases])

    def to_json(self) -> list[list]:
        return [list(p) for p in self.phases]

    @classmethod
    def from_json(cls, data: Optional[list]) -> "Timeline":
        def opt(p: list, i: int) -> Optional[float]:
            return None if len(p) <= i or p[i] is None else float(p[i])

        return cls([Phase(str(p[0]), float(p[1]), float(p[2]), opt(p, 3), opt(p, 4)) for p in (data or [])])


def phase_seconds(timeline: Timeline, prefix: str = "") -> dict[str, float]:
    """``{prefix + name + "_s": wall seconds}`` (a name timed more than once: the sum)."""
    out: dict[str, float] = {}
    for p in timeline.phases:
        key = f"{prefix}{p.name}_s"
        out[key] = round(out.get(key, 0.0) + (p.end - p.start), 3)
    return out


def process_start_time() -> Optional[float]:
    """When this process was created (``time.time()`` seconds), or None where it cannot be read."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # psutil missing or /proc unreadable: the phase is simply not reported
        return None
