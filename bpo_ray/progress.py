"""Progress that stays readable in logs: a tqdm bar on a terminal, plain lines everywhere else.

In a Ray job's log (or any file or pipe) a tqdm bar arrives as thousands of carriage-return frames.
``progress(...)`` returns tqdm only when its stream is a terminal; otherwise a ``LineProgress``
that prints one line every ``every_pct`` percent or ``every_s`` seconds, whichever comes first,
and one at the end. Ray Data's own bars switch to log lines by themselves when stdout is not a
terminal (``ray.data._internal.progress``, Ray 2.60).

``BPO_RAY_PROGRESS`` overrides the choice: ``bar``, ``lines`` or ``off`` (default ``auto``).
``quiet_library_bars`` does the same for the bars of transformers and huggingface_hub ("Loading
weights", "Writing model shards"): off where lines are used, through their documented
``HF_HUB_DISABLE_PROGRESS_BARS`` switch (transformers reads it at import).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

MODE_ENV = "BPO_RAY_PROGRESS"
MODES = ("auto", "bar", "lines", "off")
#: huggingface_hub's switch, also read by transformers' progress bars.
HF_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class LineProgress:
    """The subset of tqdm's interface the stages use (iterate, ``update``, ``set_postfix``,
    ``close``, context manager), printing whole lines instead of redrawing one."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", file: Optional[TextIO] = None, initial: int = 0, every_pct: float = 10.0,
                 every_s: float = 30.0, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file = file or sys.stderr
        self.n = self._start_n = initial
        self.every_pct, self.every_s, self._clock = every_pct, every_s, clock
        self._started = self._last_time = clock()
        self._last_bucket = self._bucket(initial)
        self._last_n = initial
        self._postfix: dict[str, Any] = {}
        self._closed = False

    def _bucket(self, n: int) -> int:
        if not self.total or self.every_pct <= 0:
            return 0
        return int(100.0 * n / self.total // self.every_pct)

    def _line(self) -> str:
        elapsed = self._clock() - self._started
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        post = "".join(f", {k}={v}" for k, v in self._postfix.items())
        return f"{self.desc}: {done} {self.unit}{pct} in {elapsed:.1f}s, {rate:.2f} {self.unit}/s{post}"

    def _emit(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self._last_time = self._clock()
        self._last_bucket = self._bucket(self.n)
        self._last_n = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bucket(self.n) > self._last_bucket or self._clock() - self._last_time >= self.every_s:
            self._emit()

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs: Any) -> None:
        self._postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:  # the final count, unless the last line already showed it
                self._emit()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
             disable: bool = False, file: Optional[TextIO] = None, initial: int = 0, every_pct: float = 10.0,
             every_s: float = 30.0, **tqdm_kwargs: Any):
    """A progress reporter for ``iterable`` (or for manual ``update`` calls): tqdm on a terminal,
    ``LineProgress`` elsewhere (see the module docstring); ``disable`` or ``BPO_RAY_PROGRESS=off``
    keeps it silent."""
    from tqdm import tqdm

    stream = file or sys.stderr
    mode = _mode()
    if disable or mode == "off":
        return tqdm(iterable, total=total, disable=True)
    if mode == "bar" or (mode == "auto" and _is_terminal(stream)):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, initial=initial, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, file=stream, initial=initial,
                        every_pct=every_pct, every_s=every_s)


def uses_bars(stream: Optional[TextIO] = None) -> bool:
    """Whether ``progress`` draws tqdm bars on ``stream`` (default stderr)."""
    mode = _mode()
    return mode == "bar" or (mode == "auto" and _is_terminal(stream or sys.stderr))


def quiet_library_bars(stream: Optional[TextIO] = None) -> bool:
    """Turn off transformers' and huggingface_hub's bars where ``progress`` prints lines (an explicit
    ``HF_HUB_DISABLE_PROGRESS_BARS`` wins); returns whether they were turned off."""
    if uses_bars(stream) or os.environ.get(HF_BARS_ENV) is not None:
        return False
    os.environ[HF_BARS_ENV] = "1"
    if "transformers" in sys.modules:  # imported already: its switch was read at import
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    return True
