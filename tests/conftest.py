"""Session-wide fixtures: one Ray cluster, one set of tiny models, one loopback S3 server.

Everything here is real: ``ray.init``, ``moto``'s S3 server on 127.0.0.1, HF checkpoints built
offline. Engines and clusters are shared so the suite stays well under CI's budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

# vLLM engine in-process (6 s start instead of 35 s), a small KV cache, no inductor compile.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The judge client's own credential (bpo_ray.serving.judge.client), for tests whose judge is a test
# server that takes any token; set before the session's Ray starts so its workers inherit it.
os.environ.setdefault("BPO_JUDGE_TOKEN", "bpo-test-suite-client")
# The embedded default's portable numerics (configs/tiny.yaml: numerics.cpu_isa avx2), set before
# torch is imported: this process, the session's Ray cluster and its workers all run AVX2 kernels.
from bpo_ray import numerics  # noqa: E402  (imports no torch)
from bpo_ray.localcluster import free_port  # noqa: E402,F401  (the tests' free loopback port)

REPO = Path(__file__).resolve().parents[1]

numerics.pin("avx2")


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Each test leaves this process's environment and torch's thread setter as it found them.

    vLLM's in-process CPU engine sets ``LD_PRELOAD`` (tcmalloc, libgomp), ``LOCAL_WORLD_SIZE`` and
    more in ``os.environ`` and replaces ``torch.set_num_threads`` with a no-op for the rest of the
    process (``vllm/platforms/cpu.py``, ``vllm/v1/worker/cpu_worker.py``). A Ray cluster or a CLI
    process started by a later test inherited that environment and computed other bits than the
    same run started anywhere else (a Ray Train worker under the preloaded tcmalloc and libgomp).
    Fixtures of a wider scope are set up before this one, so what they export stays."""
    saved = dict(os.environ)
    torch = sys.modules.get("torch")
    setter = getattr(torch, "set_num_threads", None) if torch else None
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "set_num_threads", None) is not (setter or torch._C.set_num_threads):
        torch.set_num_threads = setter or torch._C.set_num_threads


def python_last_line(code: str, env: Optional[dict[str, str]] = None, timeout_s: float = 300) -> str:
    """Run ``code`` in a fresh interpreter (in the checkout, with ``env`` or this process's
    environment), assert it succeeded, and return the last line it printed."""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll ``predicate`` until it returns something truthy and return that; time out naming ``what``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Tiny LLaVA + text LM (random init), built once per session."""
    from bpo_ray.models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole session (4 logical CPUs on 2 cores: headroom for
    Ray Data reads beside fractional-CPU actors).

    Started after the loopback S3 server, so the cluster's processes inherit its endpoint and
    credentials from the environment, as a real cluster's nodes have theirs (instance profile or
    node env); bpo-ray never forwards credentials through a runtime_env."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="bpo-ray-tests",
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible endpoint on loopback (moto's threaded server) and a test bucket.

    Sets the AWS_* environment the storage module reads; credentials are dummies for moto.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    })
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bpo-test")
    yield {"endpoint": endpoint, "bucket": "bpo-test", "root": "s3://bpo-test"}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
