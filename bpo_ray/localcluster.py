"""A real local Ray cluster started with ``ray start``, and jobs submitted to it as
``ray job submit`` would (Ray's Job Submission API).

Used by ``bpo-ray demo`` (every stage runs through the same ``python -m bpo_ray <stage>`` entrypoint a
cluster runs) and by the multi-node tests. Each cluster gets its own temp dir, so stopping it
never touches another Ray instance on the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
#: Where Ray and its jobs start: the checkout when running from one (its ``bpo_ray`` comes first on
#: ``python -m``'s path), the current directory when the package is installed.
WORKDIR = REPO if (REPO / "pyproject.toml").exists() else Path.cwd()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_port_args() -> list[str]:
    """Free ports for a node's agents. Their defaults are fixed (52365 for the job agent), so a
    cluster started right after another one stopped could find them still held and come up without
    a job agent ("No available agent to submit job" for good); seen with back-to-back demos."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def ray_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra or {})
    return env


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@dataclass
class LocalCluster:
    """``ray start --head`` (+ optional worker nodes) on loopback, in a private temp dir."""

    num_cpus: int = 2
    resources: dict = field(default_factory=dict)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="bpo-ray-"))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120) -> "LocalCluster":
        import json

        cmd = [_ray_bin(), "start", "--head", f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}",
               "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats",
               *agent_port_args()]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        subprocess.run(cmd, check=True, env=ray_env(), stdout=subprocess.DEVNULL, cwd=WORKDIR)
        self._wait_dashboard(timeout_s)
        return self

    def add_node(self, num_cpus: int = 2, resources: Optional[dict] = None) -> None:
        import json

        cmd = [_ray_bin(), "start", f"--address={self.address}", f"--num-cpus={num_cpus}",
               "--node-ip-address=127.0.0.1", "--disable-usage-stats", *agent_port_args()]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        subprocess.run(cmd, check=True, env=ray_env(), stdout=subprocess.DEVNULL, cwd=WORKDIR)

    def _wait_dashboard(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray dashboard at {self.dashboard_url} did not come up in {timeout_s}s")

    def stop(self) -> None:
        """Stop every Ray process of this cluster (and only this one)."""
        kill_processes_matching(self.temp_dir)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def kill_processes_matching(needle: str, grace_s: float = 5.0) -> int:
    """Terminate (then kill) processes whose command line contains ``needle``; returns how many.

    ``ray stop`` would stop every Ray instance of this user; a cluster's processes all carry its
    private temp dir on their command line, so they can be singled out.
    """
    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and needle in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def submit_when_ready(client, entrypoint: str, runtime_env: dict, timeout_s: float = 120) -> str:
    """``client.submit_job``, retried while the head's job agent is still starting (a fresh
    cluster answers "No available agent to submit job" for its first seconds)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)


def submit_and_wait(dashboard_url: str, stage: str, args: Sequence[str], timeout_s: float = 1800,
                    env: Optional[dict] = None, echo: bool = True) -> str:
    """Submit ``python -m bpo_ray <stage> ARGS`` as a Ray job, stream its log, return the job id.

    Raises ``RuntimeError`` with the log tail when the job does not succeed.
    """
    import shlex

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    entry = " ".join([shlex.quote(sys.executable), "-m", "bpo_ray", shlex.quote(stage)]
                     + [shlex.quote(a) for a in args])
    runtime_env = {"env_vars": {k: v for k, v in (env or {}).items()}}
    job_id = submit_when_ready(client, f"cd {shlex.quote(str(WORKDIR))} && {entry}", runtime_env)
    seen = 0
    deadline = time.time() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if echo and len(logs) > seen:
            sys.stdout.write(logs[seen:])
            sys.stdout.flush()
            seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.time() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {stage} ({job_id}) exceeded {timeout_s}s")
        time.sleep(2)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {stage} ({job_id}) ended {status}:\n{logs[-4000:]}")
    return job_id
