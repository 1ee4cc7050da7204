"""Train stage, fast tier: the start-up pieces (phase timelines, Ray Train's controller settings,
DeepSpeed's import without TorchInductor, the reference pass's blocks and output). No timings are
asserted; bench/train.py shows the speed."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from bpo_ray.schemas import PAIR_SCHEMA, read_parquet
from bpo_ray.train.data import PairsError
from bpo_ray.train.ray_settings import POLL_INTERVAL_ENV, controller_settings
from bpo_ray.train.reference import scorer_blocks, write_scored
from bpo_ray.train.timeline import Timeline, phase_seconds
from train_pairs import build_pairs_rows, write_pairs


def test_timeline_phases_round_trip_and_sum_by_name():
    timeline = Timeline()
    with timeline.phase("load"):
        pass
    timeline.add("steps", 10.0, 10.5, cpu_s=0.4)
    timeline.add("steps", 11.0, 11.25)
    again = Timeline.from_json(timeline.to_json())
    assert [p.name for p in again.phases] == ["load", "steps", "steps"]
    assert again.phases[1].cpu_s == 0.4 and again.phases[2].cpu_s is None
    assert all(p.peak_rss_mb and p.peak_rss_mb > 0 for p in again.phases)
    assert phase_seconds(again, prefix="worker.")["worker.steps_s"] == 0.75
    assert again.start_of("steps") == 10.0 and again.end_of("steps") == 11.25
    assert [p.name for p in again.prefixed("w.").phases] == ["w.load", "w.steps", "w.steps"]
    # a timeline written before CPU and RSS were recorded still reads
    assert Timeline.from_json([["old", 1.0, 2.0]]).phases[0].cpu_s is None


def test_a_phase_that_raises_is_still_recorded():
    timeline = Timeline()
    with pytest.raises(ValueError):
        with timeline.phase("validate"):
            raise ValueError("bad pairs")
    assert [p.name for p in timeline.phases] == ["validate"]


def test_controller_poll_interval_is_set_for_fit_only_and_never_overrides_the_user(monkeypatch):
    monkeypatch.delenv(POLL_INTERVAL_ENV, raising=False)
    with controller_settings(0.25):
        assert os.environ[POLL_INTERVAL_ENV] == "0.25"
    assert POLL_INTERVAL_ENV not in os.environ
    monkeypatch.setenv(POLL_INTERVAL_ENV, "3")
    with controller_settings(0.25):
        assert os.environ[POLL_INTERVAL_ENV] == "3"
    assert os.environ[POLL_INTERVAL_ENV] == "3"


def test_deepspeed_zero_check_runs_without_importing_torchinductor():
    """ZeRO's optimizer check imports DeepSpeed's Muon module; with import_deepspeed first, its
    torch.compile decorators do not pull in TorchInductor, and the check still passes AdamW."""
    code = (
        "import sys, torch\n"
        "from bpo_ray.train.zero import import_deepspeed, MUON_MODULE\n"
        "import_deepspeed()\n"
        "from deepspeed.runtime.zero.utils import is_zero_supported_optimizer\n"
        "import deepspeed.comm as dist\n"
        "dist.get_rank = lambda *a, **k: 0\n"
        "opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])\n"
        "assert is_zero_supported_optimizer(opt)\n"
        "assert MUON_MODULE in sys.modules\n"
        "print('inductor' if 'torch._inductor.compile_fx' in sys.modules else 'no inductor')\n"
        "from deepspeed.runtime import compiler\n"
        "print('compile restored' if compiler.compile() is torch.compile else 'compile patched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["no", "inductor", "compile", "restored"]


@pytest.fixture(scope="module")
def pairs_table(tmp_path_factory) -> pa.Table:
    root = tmp_path_factory.mktemp("startup_pairs")
    rows = build_pairs_rows(str(root / "world"), n_scenes=12, limit=10)
    return read_parquet(os.path.join(write_pairs(rows, str(root / "gen")), "pairs"), PAIR_SCHEMA)


def test_scorer_blocks_are_one_batch_each_in_row_order(pairs_table):
    blocks = scorer_blocks(pairs_table, 4)
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert pa.concat_tables(blocks).column("id").to_pylist() == pairs_table.column("id").to_pylist()


def test_scored_pairs_are_written_in_the_input_order_replacing_the_old_output(pairs_table, tmp_path):
    out = str(tmp_path / "ref" / "pairs")
    os.makedirs(out)
    with open(os.path.join(out, "stale-0.parquet"), "wb") as f:
        f.write(b"left over by an earlier run")
    scored = pairs_table.drop_columns(["ref_chosen_logp", "ref_rejected_logp"])
    scored = scored.append_column("ref_chosen_logp", pa.array([-float(i) for i in range(scored.num_rows)]))
    scored = scored.append_column("ref_rejected_logp", pa.array([None] * scored.num_rows, pa.float64()))
    shuffled = scored.take(list(reversed(range(scored.num_rows))))  # actors may hand blocks back in any order
    written = write_scored(shuffled, pairs_table, out)
    assert os.listdir(out) == ["pairs.parquet"]
    again = read_parquet(out, PAIR_SCHEMA)
    assert again.column("id").to_pylist() == pairs_table.column("id").to_pylist() == written.column("id").to_pylist()
    assert again.column("ref_chosen_logp").to_pylist() == [-float(i) for i in range(scored.num_rows)]
    with pytest.raises(PairsError, match="scored 9 pairs for 10 read"):
        write_scored(shuffled.slice(0, 9), pairs_table, out)
