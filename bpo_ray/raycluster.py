"""Connect to Ray the same way from the CLI, from ``ray job submit`` and from tests."""

from __future__ import annotations

import os
import sys
import uuid
from typing import Optional

from bpo_ray import numerics, storage
from bpo_ray.config.shared import NumericsConfig, RayConfig
from bpo_ray.localcluster import free_port
from bpo_ray.progress import HF_BARS_ENV

def worker_env(numerics_cfg: Optional[NumericsConfig] = None) -> dict[str, str]:
    """Environment of every Ray worker a stage starts: the driver's non-secret S3 settings
    (endpoint, region), the kernel pinning of ``numerics`` (``bpo_ray.numerics``) and no
    transformers / huggingface_hub progress bars (``HF_HUB_DISABLE_PROGRESS_BARS=1``).

    Credentials are never forwarded (a runtime_env is stored in the cluster's GCS and shown by
    the dashboard); workers get them from their node (instance profile / node environment).
    """
    env = storage.worker_settings()
    env.update(numerics.env_vars((numerics_cfg or NumericsConfig()).cpu_isa))
    # a worker's output is a log, never a terminal: no "Loading weights" bars (bpo_ray.progress)
    env.setdefault(HF_BARS_ENV, os.environ.get(HF_BARS_ENV, "1"))
    return env


def worker_runtime_env(numerics_cfg: Optional[NumericsConfig] = None, **extra: str) -> Optional[dict]:
    """``worker_env`` (plus ``extra`` variables) as a Ray ``runtime_env``; None when empty."""
    env = {**worker_env(numerics_cfg), **extra}
    return {"env_vars": env} if env else None


def ray_address_choice(cfg: RayConfig | None = None) -> tuple[Optional[str], str]:
    """Which Ray a stage uses: ``(address, why)``; ``address`` None means a fresh local instance.

    A live cluster is joined only when the user says so: ``ray.address`` in the config (or
    ``--address``; ``auto`` finds the cluster ``ray start`` started on this machine), else the
    ``RAY_ADDRESS`` environment variable (set by ``ray job submit`` for the job's driver). Otherwise
    the stage starts its own local instance, whatever ``ray start`` left running or left behind in
    ``/tmp/ray/ray_current_cluster``: plain ``ray.init()`` would join that cluster (and refuse our
    ``num_cpus``) or fail on a stale file.
    """
    cfg = cfg or RayConfig()
    if cfg.address:
        return cfg.address, "ray.address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return None, "no ray.address / RAY_ADDRESS"


GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a head node (ray._private.node)


def init_ray(cfg: RayConfig | None = None, **kwargs) -> None:
    """Join the cluster the user named (``ray_address_choice``) or start a fresh local one, and
    say which in one line on stderr. A no-op if Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address, why = ray_address_choice(cfg)
    if address:
        try:
            ray.init(address=address, namespace=cfg.namespace, log_to_driver=True, **kwargs)
        except ConnectionError as exc:
            raise ConnectionError(
                f"cannot join the Ray cluster at {address!r} (from {why}): {exc}. Start it (`ray start --head`), "
                "fix the address, or unset it to run on a fresh local Ray instance") from None
        context = ray.get_runtime_context()
        print(f"bpo-ray: joined the Ray cluster at {context.gcs_address} (from {why}); "
              f"{int(ray.cluster_resources().get('CPU', 0))} CPUs", file=sys.stderr, flush=True)
        return
    # "local": a new instance, never the one named in ray_current_cluster (Ray's ray.init docs).
    # Its own processes must find it too: Ray's state API in a worker (Ray Train's
    # PlacementGroupCleaner asks it whether the controller lives) resolves "the" cluster from
    # RAY_ADDRESS, else from ray_current_cluster, i.e. a `ray start` cluster on this machine, where
    # the controller is unknown, so the cleaner took it for dead. The GCS port is chosen up front
    # and every worker gets the address through the job's runtime_env.
    exported = os.environ.get(GCS_PORT_ENV)
    port = int(exported) if exported else free_port()
    own = f"{ray.util.get_node_ip_address()}:{port}"
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": own}
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        # Ray's dashboard head (which serves the state API) starts without the UI too, on port 8265
        # unless told otherwise: a `ray start` cluster's dashboard there would answer for this one
        kwargs.setdefault("dashboard_port", free_port())
        ray.init(address="local", num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=False,
                 runtime_env=runtime_env, **kwargs)
    finally:
        if not exported:
            os.environ.pop(GCS_PORT_ENV, None)
    if ray.get_runtime_context().gcs_address != own:  # Ray chose otherwise: say so, the run goes on
        print(f"bpo-ray: warning: the local Ray instance is at {ray.get_runtime_context().gcs_address}, not {own}; "
              "Ray's state API in its workers may find another instance on this machine", file=sys.stderr, flush=True)
    print(f"bpo-ray: started a fresh local Ray instance ({why}; num_cpus={cfg.num_cpus or 'all'}); "
          "to use a running cluster set RAY_ADDRESS or ray.address (e.g. --address auto)", file=sys.stderr, flush=True)


def check_cluster_can_write(uri: str, runtime_env: Optional[dict] = None) -> None:
    """Fail fast when the cluster's processes cannot write under a remote ``uri``.

    The driver may hold credentials the nodes lack (bpo-ray never forwards credentials to
    workers); without this check Ray Train would fail later, inside its controller, with a bare
    ``ACCESS_DENIED``. One zero-CPU task writes and deletes a probe file. Local paths pass.
    """
    if not storage.is_remote(uri):
        return
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(target: str) -> Optional[str]:
        try:
            storage.write_text(target, "bpo-ray write check\n")
            storage.delete(target)
        except Exception as exc:  # any storage failure is reported to the driver as text
            return f"{type(exc).__name__}: {exc}"
        return None

    target = storage.join(uri, f".bpo-ray-write-check-{uuid.uuid4().hex}")
    task = probe.options(runtime_env=runtime_env) if runtime_env else probe
    error = ray.get(task.remote(target))
    if error:
        raise storage.StorageError(
            f"the Ray cluster's processes cannot write to {uri}: {error}. Give the nodes storage "
            "credentials (instance profile / IAM role, or AWS_* variables in the nodes' environment); "
            "bpo-ray does not forward the driver's credentials")
