"""Every stage as a Ray job on a real two-node Ray cluster on this machine.

Two ``ray start --block`` processes play two machines: a head (``--resources {"head": 1}``) and a
worker node (``{"worker": 1}``), 2 logical CPUs each. Jobs go through the ``ray`` CLI exactly as
docs/cluster.md tells a user: ``ray job submit --working-dir . --runtime-env
cluster/runtime_env.yaml -- python jobs/<stage>.py ...``.

Isolation from other Ray instances on the machine (other tests use ``ray.init`` clusters at the
same time): each node has its own ``--temp-dir`` and explicit free ports, and runs in its own
session (``setsid``); stopping a node signals exactly the processes of that session, never
``ray stop`` (which stops every Ray on the host). Killing the worker node's session with SIGKILL
is how the node-loss tests take a "machine" away.

Which Python runs a job: the job driver is a subprocess of the head's job supervisor and inherits
the environment of the ``ray start`` that started the node, so ``python`` in the entrypoint is the
first one on that PATH. The fixture puts this venv's ``bin`` first, as a cluster node's setup puts
its own environment first (cluster/aws.yaml, the KubeRay image).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Optional, Sequence

import pytest

from conftest import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RUNTIME_ENV = "cluster/runtime_env.yaml"

pytestmark = pytest.mark.slow


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: one node and everything it started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            pids.append(pid)
    return pids


class RayNode:
    """One Ray node: a ``ray start --block`` process in a session of its own."""

    def __init__(self, name: str, args: Sequence[str], temp_dir: Path, env: dict, log_dir: Path):
        self.name, self.args, self.temp_dir, self.env = name, list(args), temp_dir, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "RayNode":
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                 "--min-worker-port=0", "--max-worker-port=0"]
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}", *ports, *self.args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                     start_new_session=True)
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Take the machine away: SIGKILL to every process of the node at once (no draining)."""
        self._signal_all(signal.SIGKILL)
        self._wait_gone(30)

    def stop(self, grace_s: float = 15) -> None:
        """Graceful stop of this node only: SIGTERM (the node drains and shuts its processes
        down), then SIGKILL for whatever is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_all(signal.SIGTERM)
        if not self._wait_gone(5):
            self._signal_all(signal.SIGKILL)
            self._wait_gone(30)

    def _signal_all(self, sig: int) -> None:
        if self.proc is None:
            return
        for pid in _session_pids(self.proc.pid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if self.proc.poll() is None and sig == signal.SIGKILL:
            self.proc.wait(10)

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None and not _session_pids(self.proc.pid):
                return True
            time.sleep(0.2)
        return False

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class TwoNodeCluster:
    """A head node and a (re-startable) worker node on loopback ports, in a private temp dir."""

    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = root
        self.cpus = cpus_per_node
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = dict(os.environ)
        self.env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            # After a node is lost, Ray Train waits this long for a worker group it sized before
            # the loss was known, then re-sizes to what is left (default 60 s).
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "45",
        })
        self.env.pop("RAY_ADDRESS", None)
        self.head = RayNode("head", [
            "--head", f"--port={self.gcs_port}", f"--num-cpus={self.cpus}", "--num-gpus=0",
            '--resources={"head": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
            # A lost node is declared dead after ~5 missed 1 s health checks (default ~15 s+).
            '--system-config={"health_check_period_ms": 1000, "health_check_failure_threshold": 5}',
        ], root / "h", self.env, root)
        self.worker: Optional[RayNode] = None
        self.worker_joined_at = 0.0
        self._worker_starts = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout_s: float = 120, with_worker: bool = True) -> "TwoNodeCluster":
        self.head.start()
        self._wait_dashboard(timeout_s)
        self.wait_alive_nodes(1, timeout_s)
        if with_worker:
            self.start_worker(timeout_s)
        return self

    def ensure_worker(self) -> RayNode:
        if self.worker is None or not self.worker.alive:
            self.start_worker()
        return self.worker

    def start_worker(self, timeout_s: float = 180, attempts: int = 3) -> RayNode:
        """Start (or restart, after a kill) the worker node; returns once the cluster sees it.

        On a loaded machine ``ray start`` can give up after its fixed 30 s wait for the raylet
        to register ("node timed out during startup"); such an attempt is cleaned up and retried.
        """
        assert self.worker is None or not self.worker.alive, "worker node already running"
        expected = len(self.alive_nodes()) + 1
        for attempt in range(1, attempts + 1):
            self._worker_starts += 1
            self.worker = RayNode(f"worker{self._worker_starts}", [
                f"--address={self.gcs_address}", f"--num-cpus={self.cpus}", "--num-gpus=0",
                '--resources={"worker": 1}',
            ], self.root / f"w{self._worker_starts}", self.env, self.root).start()
            deadline = time.time() + timeout_s
            while time.time() < deadline and self.worker.alive:
                try:
                    if len(self.alive_nodes()) == expected:
                        self.worker_joined_at = time.time()
                        return self.worker
                except Exception:
                    pass
                time.sleep(1)
            log = self.worker.log_tail()
            self.worker.stop()
            if attempt == attempts:
                raise TimeoutError(f"worker node did not join after {attempts} attempts:\n{log}")
        raise AssertionError("unreachable")

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        # raise_on_missing_output=False: with a dead node in the table, Ray counts the filtered-out
        # row as "truncated" and would raise.
        nodes = list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True,
                           raise_on_missing_output=False)
        return [{"node_id": n.node_id, "resources": n.resources_total} for n in nodes]

    def wait_until_train_sees_the_worker(self) -> None:
        """Ray Train's elastic policy sizes a run from the reservations of Ray's autoscaling
        coordinator, whose view of the cluster's nodes is refreshed once a tick
        (``TICK_INTERVAL_S``, 20 s): a run started sooner after the worker joined does not see it."""
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            _AutoscalingCoordinatorActor,
        )

        ready_at = self.worker_joined_at + _AutoscalingCoordinatorActor.TICK_INTERVAL_S + 5
        time.sleep(max(0.0, ready_at - time.time()))

    def node_id_with(self, resource: str) -> str:
        return next(n["node_id"] for n in self.alive_nodes() if resource in n["resources"])

    def ray_job_id(self, submission_id: str, timeout_s: float = 120) -> str:
        """The Ray job id (hex) of a submission, once its driver has started."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            info = client.get_job_info(submission_id)
            if info.job_id:
                return info.job_id
            if str(info.status.value) in ("FAILED", "STOPPED"):
                raise RuntimeError(f"job {submission_id} ended before its driver started:\n{info.message}")
            time.sleep(0.5)
        raise TimeoutError(f"job {submission_id} has no driver after {timeout_s}s")

    def actors(self, job_hex: str, class_contains: str, alive_only: bool = True) -> list[dict]:
        """Actors of one job whose class name contains ``class_contains`` (state API)."""
        from ray.util.state import list_actors

        filters = [("job_id", "=", job_hex)]
        if alive_only:
            filters.append(("state", "=", "ALIVE"))
        found = list_actors(address=self.dashboard_url, filters=filters, detail=True, limit=10000,
                            raise_on_missing_output=False)
        return [{"class": a.class_name, "node_id": a.node_id, "state": a.state, "actor_id": a.actor_id}
                for a in found if class_contains in (a.class_name or "")]

    def wait_alive_nodes(self, n: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.time() + timeout_s
        nodes: list[dict] = []
        while time.time() < deadline:
            try:
                nodes = self.alive_nodes()
            except Exception:  # the state API answers only once the dashboard is fully up
                nodes = []
            if len(nodes) == n:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{len(nodes)} alive nodes after {timeout_s}s, expected {n}\n"
                           f"head log:\n{self.head.log_tail()}\nworker log:\n"
                           f"{self.worker.log_tail() if self.worker else ''}")

    def _wait_dashboard(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not self.head.alive:
                raise RuntimeError(f"head node exited:\n{self.head.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"dashboard not up after {timeout_s}s:\n{self.head.log_tail()}")

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.head.stop()

    # --- jobs, through the `ray` CLI ---------------------------------------------------------

    def _cli(self, args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)

    def submit(self, entrypoint: Sequence[str], timeout_s: float = 300, wait: bool = True) -> tuple[str, subprocess.CompletedProcess]:
        """``ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- ENTRYPOINT``.

        With ``wait`` the CLI tails the job until it ends (its exit code is non-zero when the job
        fails); without, it returns once the job is accepted. Returns (submission id, result)."""
        job_id = f"bpo-test-{uuid.uuid4().hex[:10]}"
        args = ["job", "submit", "--address", self.dashboard_url, "--submission-id", job_id,
                "--working-dir", ".", "--runtime-env", RUNTIME_ENV]
        if not wait:
            args.append("--no-wait")
        result = self._cli([*args, "--", *entrypoint], timeout_s)
        return job_id, result

    def job_status(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.dashboard_url).get_job_status(job_id).value)

    def job_logs(self, job_id: str) -> str:
        return self._cli(["job", "logs", "--address", self.dashboard_url, job_id], 60).stdout

    def wait_job(self, job_id: str, timeout_s: float) -> str:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(1)
        self._cli(["job", "stop", "--address", self.dashboard_url, job_id], 60)
        raise TimeoutError(f"job {job_id} still running after {timeout_s}s:\n{self.job_logs(job_id)[-4000:]}")


def _ok(result: subprocess.CompletedProcess) -> str:
    """The CLI's output, after asserting the job succeeded (with the log tail if it did not)."""
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"ray job submit exited {result.returncode}:\n{out[-6000:]}"
    assert "succeeded" in out, out[-6000:]
    return out




def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r.get("event") is None and "step" in r]


def _starts(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == "start"]


# ---------------------------------------------------------------------------------------------
# fixtures: one cluster for the module; each stage's job runs once and later stages use its output


@pytest.fixture(scope="module")
def cluster():
    """The head node only; the generate test adds the worker node while its job runs."""
    root = Path(tempfile.mkdtemp(prefix="bporc", dir="/tmp"))  # short: Ray's socket paths
    c = TwoNodeCluster(root)
    try:
        c.start(with_worker=False)
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def two_nodes(cluster) -> TwoNodeCluster:
    cluster.ensure_worker()
    return cluster


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster_run")


@pytest.fixture(scope="module")
def world(work) -> Path:
    """A small bias world (test data, not a stage): 40 scenes, ~150 train items."""
    from bpo_ray.world.build import build_world

    build_world(str(work / "world"), seed=0, n_scenes=40, corpus_lines=200)
    return work / "world"


@pytest.fixture(scope="module")
def models(cluster, work) -> dict[str, str]:
    """The tiny models, built by a Ray job on the cluster (`jobs/models.py`)."""
    out = work / "models"
    _ok(cluster.submit(["python", "jobs/models.py", "tiny", "--out", str(out)], timeout_s=300)[1])
    return {"mllm": str(out / "llava"), "text_llm": str(out / "text_lm")}


def _first_shard(generated: dict) -> str:
    return str(sorted((generated["out"] / "pairs").glob("*.parquet"))[0])


def _model_sets(models: dict[str, str]) -> list[str]:
    return ["--set", f"models.mllm={models['mllm']}", "--set", f"models.text_llm={models['text_llm']}"]


@pytest.fixture(scope="module")
def generated(cluster, world, models, work) -> dict:
    """The generate job, submitted while only the head is up; the worker node joins once the
    sampler pool runs, and the pool is watched through the state API until the job ends."""
    out = work / "generate"
    t_submit = time.time()
    job, result = cluster.submit([
        "python", "jobs/generate.py", "--config", "tiny", "--source", str(world / "train.jsonl"),
        "--out", str(out), "--no-progress", *_model_sets(models),
        # Long answers from the sampler so its pool is still busy when the new node arrives.
        "--set", "generate.sampler.sampling.max_new_tokens=96", "--set", "generate.sampler.noise.steps=[300,500,700,900]",
        # One CPU per sampler: beside the injector (0.5) the head holds one sampler and no second,
        # so the pool can only grow onto the node that joins.
        "--set", "generate.sampler.pool={min_size: 1, max_size: 3, num_cpus: 1.0, batch_size: 1}",
        "--set", "generate.injector.sampling.max_new_tokens=8",
        "--set", "generate.injector.pool={min_size: 1, max_size: 1, num_cpus: 0.5, batch_size: 4}",
        "--set", "generate.shard_size=16",  # small shards: the later stages take the first one only
    ], wait=False)
    assert result.returncode == 0, result.stdout + result.stderr
    job_hex = cluster.ray_job_id(job)
    sampler = "ImageWeakenedSampler"
    before = wait_for(lambda: cluster.actors(job_hex, sampler), 300, "the sampler pool to start", 1.0)
    head_id = cluster.node_id_with("head")
    assert {a["node_id"] for a in before} == {head_id}
    t_first = time.time()
    cluster.start_worker()
    t_join = time.time()
    worker_id = cluster.node_id_with("worker")
    alive_on_worker: set[str] = set()
    while cluster.job_status(job) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        alive_on_worker |= {a["actor_id"] for a in cluster.actors(job_hex, sampler) if a["node_id"] == worker_id}
        assert time.time() - t_join < 900, "generate job still running after 15 min"
        time.sleep(1.0)
    # Every sampler actor the job ever had, with the node it was placed on (dead ones included:
    # the pool is torn down when its stage completes).
    everyone = cluster.actors(job_hex, sampler, alive_only=False)
    return {"out": out, "status": cluster.job_status(job), "logs": cluster.job_logs(job),
            "before_join": {a["actor_id"] for a in before}, "head_id": head_id, "worker_id": worker_id,
            "placed": {a["actor_id"]: a["node_id"] for a in everyone},
            "seen_alive_on_worker": len(alive_on_worker),
            "timeline_s": {"pool_started": round(t_first - t_submit, 1), "node_joined": round(t_join - t_submit, 1),
                           "job_ended": round(time.time() - t_submit, 1)}}


@pytest.fixture(scope="module")
def referenced(cluster, generated, models, work) -> Path:
    """The reference job on the first generate shard (16 source items), to keep later stages short."""
    out = work / "reference"
    cluster.ensure_worker()
    _ok(cluster.submit(["python", "jobs/reference.py", "--config", "tiny", "--pairs", _first_shard(generated),
                          "--out", str(out), *_model_sets(models)], timeout_s=600)[1])
    return out


TRAIN_MAX_STEPS = 12


@pytest.fixture(scope="module")
def trained_through_node_loss(cluster, referenced, models, work) -> dict:
    """Elastic training (1..4 workers, one CPU each: 2 per node) from both nodes; once a
    checkpoint exists and a step beyond it ran, the worker node is killed (SIGKILL to all of its
    processes, as when a machine dies). The run must go on with the head's workers and finish."""
    cluster.ensure_worker()
    out = work / "train"
    job, result = cluster.submit([
        "python", "jobs/train.py", "--config", "tiny", "--pairs", str(referenced), "--out", str(out),
        *_model_sets(models), "--set", "train.num_workers=[1,4]", "--set", "train.per_device_batch_size=1",
        "--set", "train.grad_accum=1", "--set", f"train.max_steps={TRAIN_MAX_STEPS}",
        "--set", "train.checkpoint_every=3", "--set", "train.epochs=1",
    ], wait=False)
    assert result.returncode == 0, result.stdout + result.stderr
    job_hex = cluster.ray_job_id(job)
    workers = wait_for(lambda: (w := cluster.actors(job_hex, "RayTrainWorker")) and len(w) == 4 and w,
                        300, "4 training workers")
    nodes_before = {w["node_id"] for w in workers}

    def past_a_checkpoint() -> bool:
        ckpts = list((out / "checkpoints").glob("checkpoint_*")) if (out / "checkpoints").exists() else []
        steps = _steps(_metrics(out))
        return bool(ckpts) and bool(steps) and max(steps) >= 4

    wait_for(past_a_checkpoint, 300, "a checkpoint and a step past it", 0.2)
    step_at_kill = max(_steps(_metrics(out)))
    assert step_at_kill < TRAIN_MAX_STEPS, "training finished before the node could be killed"
    cluster.worker.kill()
    status = cluster.wait_job(job, 600)
    return {"out": out, "status": status, "logs": cluster.job_logs(job), "step_at_kill": step_at_kill,
            "nodes_before": nodes_before, "records": _metrics(out)}


@pytest.fixture(scope="module")
def served(cluster, trained_through_node_loss, models, work) -> dict:
    """``serve deploy serve/config.yaml``: the repo's file with this run's paths and a free port."""
    import yaml

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    for app in config["applications"]:
        app["args"]["overrides"] = [f"models.mllm={models['mllm']}",
                                    f"serve.judge.cache_path={work / 'judge_cache.sqlite'}"]
        if app["name"] == "model":
            app["args"]["adapters"] = {"bpo": str(trained_through_node_loss["out"] / "adapter")}
    path = work / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve = str(VENV_BIN / "serve")
    deployed = subprocess.run([serve, "deploy", str(path), "-a", cluster.dashboard_url], cwd=REPO, env=cluster.env,
                              capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    def all_running():
        shown = subprocess.run([serve, "status", "-a", cluster.dashboard_url], cwd=REPO, env=cluster.env,
                               capture_output=True, text=True, timeout=60)
        apps = (yaml.safe_load(shown.stdout) or {}).get("applications", {})
        failed = {k: v for k, v in apps.items() if v["status"] in ("DEPLOY_FAILED", "UNHEALTHY")}
        assert not failed, shown.stdout
        return len(apps) == 2 and all(v["status"] == "RUNNING" for v in apps.values()) and apps

    apps = wait_for(all_running, 300, "both Serve applications RUNNING", 2.0)
    # No `serve shutdown` after: the module's cluster is stopped next, which ends the apps with it
    # (a graceful shutdown cost this test ~26 s of waiting).
    yield {"url": f"http://127.0.0.1:{port}", "apps": apps}


# ---------------------------------------------------------------------------------------------
# tests, in pipeline order


def test_models_job_builds_loadable_tiny_models(models):
    from bpo_ray.models.loading import load_mllm, load_text_lm

    model, processor = load_mllm(models["mllm"], dtype="float32", device="cpu")
    assert model.config.model_type == "llava" and processor is not None
    lm, tokenizer = load_text_lm(models["text_llm"], dtype="float32", device="cpu")
    assert lm.config.vocab_size >= len(tokenizer)


def test_generate_job_writes_pairs_and_its_pool_grows_when_a_node_joins(generated):
    from bpo_ray.schemas import PAIR_SCHEMA, QUARANTINE_SCHEMA, read_manifest, read_parquet

    assert generated["status"] == "SUCCEEDED", generated["logs"][-6000:]
    out = generated["out"]
    manifest = read_manifest(str(out / "manifest.json"))
    c = manifest.counts
    assert c.items_in > 100 and c.items_in == c.paired + c.filtered + c.quarantined
    pairs = read_parquet(str(out / "pairs"), PAIR_SCHEMA).to_pylist()
    assert len(pairs) == c.pairs_written > 0
    assert {p["strategy"] for p in pairs} == {"image_weakened", "error_injection"}
    assert all(Path(p["image"]).is_absolute() and Path(p["image"]).exists() for p in pairs)
    if (out / "quarantine").exists() and any((out / "quarantine").iterdir()):
        assert read_parquet(str(out / "quarantine"), QUARANTINE_SCHEMA).num_rows == c.quarantined
    # Autoscaling: the sampler pool ran on the head alone, then grew onto the node that joined
    # (an actor placed there while the job ran; whether it also got to serve batches before the
    # stage drained depends on the machine's speed and is reported, not asserted).
    placed = generated["placed"]
    assert generated["before_join"] <= set(placed)
    assert all(placed[a] == generated["head_id"] for a in generated["before_join"])
    added = {a: n for a, n in placed.items() if a not in generated["before_join"]}
    assert generated["worker_id"] in added.values(), (
        f"no sampler actor was placed on the node that joined: {placed}, timeline {generated['timeline_s']}")
    print(f"sampler pool: {len(generated['before_join'])} before the join, {len(placed)} in all, "
          f"{sum(n == generated['worker_id'] for n in placed.values())} on the new node "
          f"({generated['seen_alive_on_worker']} seen running); timeline {generated['timeline_s']}")


def test_job_runs_the_uploaded_code_on_both_nodes_with_the_venv_python(two_nodes):
    """Tasks pinned to each node import ``bpo_ray`` from the uploaded working dir (not from this
    checkout), with the same interpreter, and see the runtime env's variables."""
    code = (
        "import json, sys, ray\n"
        "ray.init()\n"
        "@ray.remote(num_cpus=0.1)\n"
        "def where():\n"
        "    import os, bpo_ray\n"
        "    return {'node': ray.get_runtime_context().get_node_id(), 'bpo_ray': bpo_ray.__file__,\n"
        "            'python': sys.executable, 'unbuffered': os.environ.get('PYTHONUNBUFFERED')}\n"
        "refs = [where.options(resources={r: 0.01}).remote() for r in ('head', 'worker')]\n"
        "print('RESULT', json.dumps({'driver': sys.executable, 'tasks': ray.get(refs)}))\n"
    )
    out = _ok(two_nodes.submit(["python", "-c", code], timeout_s=180)[1])
    payload = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    # resolve(): the venv may be a symlink (its python then reports the link target)
    assert Path(payload["driver"]).parent.resolve() == VENV_BIN.resolve()
    tasks = payload["tasks"]
    assert tasks[0]["node"] != tasks[1]["node"], "both tasks ran on one node"
    for t in tasks:
        assert "_ray_pkg_" in t["bpo_ray"], f"bpo_ray not imported from the working-dir upload: {t['bpo_ray']}"
        assert not t["bpo_ray"].startswith(str(REPO)), "worker imported the checkout, not the upload"
        assert Path(t["python"]).parent.resolve() == VENV_BIN.resolve()
        assert t["unbuffered"] == "1", "cluster/runtime_env.yaml env_vars not applied"


def test_reference_job_adds_reference_logps_to_every_pair(generated, referenced):
    from bpo_ray.schemas import PAIR_SCHEMA, read_parquet

    before = read_parquet(_first_shard(generated), PAIR_SCHEMA).to_pylist()
    after = read_parquet(str(referenced / "pairs"), PAIR_SCHEMA).to_pylist()
    assert len(before) >= 4 * TRAIN_MAX_STEPS, "too few pairs for the training tests"
    assert sorted(p["id"] for p in after) == sorted(p["id"] for p in before)
    for p in after:
        assert p["ref_chosen_logp"] is not None and p["ref_rejected_logp"] is not None
        assert p["ref_chosen_logp"] < 0 and p["ref_rejected_logp"] < 0  # log-probs of whole answers


def test_training_continues_from_its_checkpoint_after_losing_a_node(trained_through_node_loss):
    run = trained_through_node_loss
    assert run["status"] == "SUCCEEDED", run["logs"][-6000:]
    assert len(run["nodes_before"]) == 2, "training did not start with workers on both nodes"
    records = run["records"]
    starts = _starts(records)
    assert starts[0]["world_size"] == 4 and starts[0]["resumed_from_step"] is None
    restart = next(s for s in starts[1:] if s["world_size"] < 4)  # what remained after the loss
    assert restart["world_size"] == 2
    resumed = restart["resumed_from_step"]
    assert resumed is not None and 3 <= resumed <= run["step_at_kill"], (resumed, run["step_at_kill"])
    after = _steps(records[records.index(restart):])
    assert after[0] == resumed + 1, "the restarted run did not continue from the checkpoint"
    assert max(after) == TRAIN_MAX_STEPS > run["step_at_kill"], "step counter did not go past the kill"
    print(f"node loss: world size {starts[0]['world_size']} on 2 nodes, worker node killed at step "
          f"{run['step_at_kill']}, restarted at world size {restart['world_size']} from the step-{resumed} "
          f"checkpoint, steps {after[0]}..{max(after)}, status {run['status']}")
    out = run["out"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "manifest.json").exists()


def test_next_training_run_uses_the_returned_node(trained_through_node_loss, referenced, models, work, two_nodes):
    """The lost node comes back (a fresh `ray start`); the next elastic run spans both nodes."""
    cluster = two_nodes  # ensure_worker restarted it
    cluster.wait_until_train_sees_the_worker()
    out = work / "train_again"
    job, result = cluster.submit([
        "python", "jobs/train.py", "--config", "tiny", "--pairs", str(referenced), "--out", str(out),
        *_model_sets(models), "--set", "train.num_workers=[1,4]", "--set", "train.per_device_batch_size=1",
        "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2",
    ], timeout_s=600)
    _ok(result)
    starts = _starts(_metrics(out))
    assert starts and starts[0]["world_size"] == 4
    nodes = {a["node_id"] for a in cluster.actors(cluster.ray_job_id(job), "RayTrainWorker", alive_only=False)}
    assert nodes == {cluster.node_id_with("head"), cluster.node_id_with("worker")}


def test_serve_deploy_serves_the_trained_adapter(served, world):
    import base64

    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=120)
    assert {m.id for m in client.models.list()} == {"base", "bpo"}
    image = next((world / "images").glob("*.png"))
    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    reply = client.chat.completions.create(model="bpo", max_tokens=8, temperature=0, messages=[{
        "role": "user", "content": [{"type": "text", "text": "Is there a cup in the image?"},
                                    {"type": "image_url", "image_url": {"url": data_url}}]}])
    assert reply.model == "bpo" and reply.usage.completion_tokens > 0


def test_evaluate_job_scores_the_served_model(cluster, served, world, work):
    out = work / "evaluate"
    _ok(cluster.submit(["python", "jobs/evaluate.py", "--config", "tiny", "--model-url", f"{served['url']}/v1",
                        "--model", "bpo", "--out", str(out), "--set", f"evaluate.world={world}",
                        "--set", "evaluate.max_items=4"], timeout_s=600)[1])
    metrics = json.loads((out / "bpo" / "metrics.json").read_text())
    assert set(metrics["benchmarks"]) == {"chair", "pope"}
    assert all(c["scored"] > 0 and c["failed"] == 0 for c in metrics["counts"].values())
    assert (out / "report.md").exists()
