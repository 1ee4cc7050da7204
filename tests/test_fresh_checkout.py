"""A fresh checkout runs ``bpo-ray generate --config tiny`` with no prior step, with a local Ray
already running (``ray start --head``) and with a stale ``ray_current_cluster`` (issue #19, 3).

Each scenario runs the real CLI in a subprocess whose working directory has no ``runs/`` (the
tiny config's model paths are missing) and whose ``RAY_TMPDIR`` is private, so the Ray instances
found there are the ones this module started and nobody else's are touched. The live cluster is a
real ``ray start --head`` (``LocalCluster``) with ``--temp-dir`` = ``$RAY_TMPDIR/ray``: the place
``ray.init()`` reads ``ray_current_cluster`` from, which is what broke every stage before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bpo_ray.localcluster import LocalCluster, free_port
from bpo_ray.world.build import build_world

REPO = Path(__file__).resolve().parents[1]
ITEMS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fresh_world")
    build_world(str(out), seed=0, n_scenes=30, corpus_lines=100)
    return out


@pytest.fixture
def ray_tmpdir():
    # short: Ray's unix sockets live under it (108-byte limit); pytest's tmp_path can be too long
    base = Path(tempfile.mkdtemp(prefix="bpo-fc-", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _env(ray_tmpdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BPO_RAY_PROGRESS")}
    env.update(RAY_TMPDIR=str(ray_tmpdir), PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _generate(checkout: Path, world: Path, out: Path, ray_tmpdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bpo_ray.cli", "generate", "--config", "tiny", "--source", str(world / "train.jsonl"),
           "--out", str(out), "--set", f"generate.max_items={ITEMS}", *extra]
    return subprocess.run(cmd, cwd=checkout, env=_env(ray_tmpdir), capture_output=True, text=True, timeout=600)


def _check_generated(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["items_in"] == ITEMS
    assert counts["paired"] + counts["filtered"] + counts["quarantined"] == ITEMS
    assert list((out / "pairs").glob("*.parquet"))
    # progress without a terminal: whole lines, no tqdm frames
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert f"generate: {ITEMS}/{ITEMS} item (100%)" in proc.stderr


def test_generate_with_a_running_ray_starts_its_own_and_joins_it_when_told(tmp_path, world, ray_tmpdir):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    with LocalCluster(num_cpus=2, temp_dir=str(ray_tmpdir / "ray")) as cluster:
        # the node's own IP and the head's GCS port
        assert (ray_tmpdir / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{cluster.gcs_port}")

        proc = _generate(checkout, world, tmp_path / "own", ray_tmpdir)
        _check_generated(proc, tmp_path / "own")
        assert "started a fresh local Ray instance" in proc.stderr
        assert "num_cpus and num_gpus must not be provided" not in proc.stderr
        # the missing tiny models were built on first use, in the checkout, before Ray started
        assert "built the tiny random-init models" in proc.stderr
        assert proc.stderr.index("built the tiny random-init models") < proc.stderr.index("started a fresh local Ray")
        assert (checkout / "runs/tiny/models/llava/config.json").exists()
        assert (checkout / "runs/tiny/models/text_lm/config.json").exists()

        joined = _generate(checkout, world, tmp_path / "joined", ray_tmpdir, "--address", "auto")
        _check_generated(joined, tmp_path / "joined")
        assert re.search(rf"joined the Ray cluster at [0-9.]+:{cluster.gcs_port} \(from ray.address\)", joined.stderr)
        assert "built the tiny random-init models" not in joined.stderr  # built once, then reused


def test_generate_with_a_stale_ray_current_cluster_starts_a_fresh_one(tmp_path, world, ray_tmpdir):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    # what a killed `ray start --head` leaves behind: the address of a GCS nobody listens on
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    proc = _generate(checkout, world, tmp_path / "out", ray_tmpdir)
    try:
        _check_generated(proc, tmp_path / "out")
        assert "started a fresh local Ray instance" in proc.stderr
    finally:
        from bpo_ray.localcluster import kill_processes_matching

        kill_processes_matching(str(ray_tmpdir))  # nothing should be left; only ours could match


def test_a_missing_model_outside_the_embedded_default_fails_before_ray_starts(tmp_path, world, ray_tmpdir):
    config = tmp_path / "mine.yaml"
    config.write_text((REPO / "configs" / "tiny.yaml").read_text().replace("name: tiny", "name: mine"))
    proc = subprocess.run(
        [sys.executable, "-m", "bpo_ray.cli", "generate", "--config", str(config), "--source", str(world / "train.jsonl"),
         "--out", str(tmp_path / "out"), "--set", f"models.mllm={tmp_path}/nowhere/llava",
         "--set", f"models.text_llm={tmp_path}/nowhere/text_lm"],
        cwd=tmp_path, env=_env(ray_tmpdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"`bpo-ray models tiny --out {tmp_path}/nowhere`" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (ray_tmpdir / "ray").exists()  # no Ray session was started
    assert not (tmp_path / "nowhere").exists()


RESOLVE = """
import json, os, sys
from bpo_ray.config.shared import RayConfig
from bpo_ray.raycluster import init_ray
init_ray(RayConfig())
import ray

@ray.remote(num_cpus=0)
class Probe:
    def resolve(self):
        # what Ray Train's PlacementGroupCleaner does to ask whether its controller lives
        from ray.dashboard.utils import get_address_for_submission_client
        return os.environ.get("RAY_ADDRESS"), get_address_for_submission_client(None)

address, api = ray.get(Probe.remote().resolve.remote())
print("RESULT " + json.dumps({"own_gcs": ray.get_runtime_context().gcs_address, "worker_ray_address": address,
                              "worker_api_server": api}))
"""


def test_a_fresh_instance_beside_a_running_cluster_answers_its_own_workers(tmp_path, ray_tmpdir):
    """With a `ray start` cluster on the machine, the workers of the fresh instance a stage starts
    find that instance, not the other one, when they use Ray's state API: Ray Train's
    PlacementGroupCleaner asks it whether the controller lives, and an answer from the other
    cluster ("no such actor") made it take the controller for dead and exit, or remove the run's
    placement group. Seen in session 20 with `ray start --head` running beside `bpo-ray train`."""
    with LocalCluster(num_cpus=1, temp_dir=str(ray_tmpdir / "ray")) as cluster:
        proc = subprocess.run([sys.executable, "-c", RESOLVE], cwd=tmp_path, env=_env(ray_tmpdir), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
        assert result["worker_ray_address"] == result["own_gcs"]
        assert not result["own_gcs"].endswith(f":{cluster.gcs_port}")
        assert result["worker_api_server"] != cluster.dashboard_url
        assert "multiple active Ray instances" not in proc.stderr
