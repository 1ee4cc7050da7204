"""Train stage, fast tier: the start-up pieces (phase timelines, Ray Train's controller settings,
DeepSpeed's import without TorchInductor, the reference pass's blocks and output). No timings are
asserted; bench/train.py shows the speed."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo_ray.schemas import PAIR_SCHEMA, read_parquet
from bpo_ray.train.data import PairsError
from bpo_ray.train.ray_settings import POLL_INTERVAL_ENV, controller_settings
from bpo_ray.train.reference import blocks_per_unit, check_pair_columns, pair_files, plan_units, read_unit
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


@pytest.fixture(scope="module")
def pair_dir(pairs_table, tmp_path_factory) -> str:
    """The 10 pairs in three files: 3, 0 and 7 rows (row groups of 2)."""
    out = tmp_path_factory.mktemp("pair_files")
    for name, (start, n) in {"part-0": (0, 3), "part-1": (3, 0), "part-2": (3, 7)}.items():
        pq.write_table(pairs_table.slice(start, n), os.path.join(out, f"{name}.parquet"), row_group_size=2)
    return str(out)


def test_units_cut_blocks_where_the_whole_table_would_be_cut(pair_dir, pairs_table):
    files = pair_files(pair_dir)
    assert [n for _, n in files] == [3, 0, 7]
    for block_rows, per_unit in ((4, 1), (4, 2), (3, 5), (1, 3)):
        units = plan_units(files, block_rows, per_unit)
        tables = [read_unit(u) for u in units]
        assert all(t.num_rows == block_rows * per_unit for t in tables[:-1])  # blocks never straddle units
        assert pa.concat_tables(tables).column("id").to_pylist() == pairs_table.column("id").to_pylist()
    assert blocks_per_unit(10_000, 32, 1) == 64 and blocks_per_unit(100, 32, 2) == 1 and blocks_per_unit(2188, 4, 1) == 64


def test_pair_files_are_checked_from_footers_and_columns(pair_dir, pairs_table, tmp_path):
    with pytest.raises(PairsError, match="path does not exist"):
        pair_files(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    pq.write_table(pairs_table.slice(0, 0), tmp_path / "empty" / "p.parquet")
    with pytest.raises(PairsError, match="hold 0 rows"):
        pair_files(str(tmp_path / "empty"))
    (tmp_path / "nulls").mkdir()
    nulls = pairs_table.set_column(pairs_table.schema.get_field_index("chosen"), pa.field("chosen", pa.string()),
                                   pa.array([None] + pairs_table.column("chosen").to_pylist()[1:]))
    pq.write_table(nulls, tmp_path / "nulls" / "p.parquet")
    with pytest.raises(PairsError, match="column 'chosen' has 1 nulls"):
        pair_files(str(tmp_path / "nulls"))
    (tmp_path / "cols").mkdir()
    pq.write_table(pairs_table.drop_columns(["rejected"]), tmp_path / "cols" / "p.parquet")
    with pytest.raises(PairsError, match=r"missing columns \['rejected'\]"):
        pair_files(str(tmp_path / "cols"))
    for column, value, needle in (("strategy", "made_up", "unknown strategy values"),
                                  ("image", "/nonexistent/x.png", "name 1 images that do not exist")):
        (tmp_path / column).mkdir()
        i = pairs_table.schema.get_field_index(column)
        bad = pairs_table.set_column(i, pairs_table.schema.field(i),
                                     pa.array([value] + pairs_table.column(column).to_pylist()[1:]))
        pq.write_table(bad, tmp_path / column / "p.parquet")
        with pytest.raises(PairsError, match=needle):
            check_pair_columns(pair_files(str(tmp_path / column)))
    check_pair_columns(pair_files(pair_dir))  # the good files pass


