"""Progress in logs: whole lines every N% / M seconds where no terminal is attached (issue #19, 3)."""

from __future__ import annotations

import io
import os
import re

import pytest

from bpo_ray.progress import MODE_ENV, LineProgress, progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_one_line_per_ten_percent_and_no_carriage_returns(monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    log = io.StringIO()
    seen = list(progress(range(1000), desc="generate", unit="item", file=log))
    assert seen == list(range(1000))
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 100%; close repeats nothing
    done = [int(re.match(r"generate: (\d+)/1000 item \((\d+)%\)", line).group(1)) for line in lines]
    assert done == [100 * k for k in range(1, 11)]


def test_time_based_lines_between_percent_steps_and_a_final_line():
    clock, log = FakeClock(), io.StringIO()
    bar = LineProgress(total=10_000, desc="dpo", unit="step", file=log, every_pct=50, every_s=30, clock=clock)
    for _ in range(3):
        clock.now += 31  # slow steps: a line every 30 s although no 50% boundary was crossed
        bar.update(1)
    bar.set_postfix(loss="0.6931")
    bar.update(1)  # 4 s later: nothing
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" step")[0] for line in lines] == ["dpo: 1/10000", "dpo: 2/10000", "dpo: 3/10000", "dpo: 4/10000"]
    assert lines[-1].endswith("loss=0.6931") and "0.04 step/s" in lines[-1]


def test_unknown_total_and_resumed_start():
    log = io.StringIO()
    bar = LineProgress(desc="eval", file=log, initial=5)
    bar.update(2)
    bar.close()
    bar.close()  # idempotent
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval: 7 it in ")


def test_a_terminal_keeps_tqdm_and_the_env_overrides(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv(MODE_ENV, raising=False)
    assert isinstance(progress(total=3, file=FakeTerminal()), tqdm)
    assert isinstance(progress(total=3, file=io.StringIO()), LineProgress)
    monkeypatch.setenv(MODE_ENV, "bar")
    assert isinstance(progress(total=3, file=io.StringIO()), tqdm)
    monkeypatch.setenv(MODE_ENV, "lines")
    assert isinstance(progress(total=3, file=FakeTerminal()), LineProgress)
    monkeypatch.setenv(MODE_ENV, "off")
    silent = io.StringIO()
    list(progress(range(5), file=silent))
    assert silent.getvalue() == ""
    monkeypatch.setenv(MODE_ENV, "fancy")
    with pytest.raises(ValueError, match="BPO_RAY_PROGRESS='fancy'"):
        progress(total=3)


def test_library_bars_are_off_where_lines_are_used_and_for_workers(monkeypatch):
    from bpo_ray.config.shared import NumericsConfig
    from bpo_ray.progress import HF_BARS_ENV, quiet_library_bars
    from bpo_ray.raycluster import worker_env

    monkeypatch.delenv(MODE_ENV, raising=False)
    monkeypatch.delenv(HF_BARS_ENV, raising=False)
    assert quiet_library_bars(FakeTerminal()) is False and HF_BARS_ENV not in os.environ
    assert quiet_library_bars(io.StringIO()) is True
    assert os.environ[HF_BARS_ENV] == "1"
    assert worker_env(NumericsConfig())[HF_BARS_ENV] == "1"
    monkeypatch.setenv(HF_BARS_ENV, "0")  # the user's explicit choice wins
    assert quiet_library_bars(io.StringIO()) is False
    assert worker_env(NumericsConfig())[HF_BARS_ENV] == "0"
