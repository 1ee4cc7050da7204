"""Connect to Ray the same way from the CLI, from ``ray job submit`` and from tests."""

from __future__ import annotations

import os

from bpo_ray.config.shared import RayConfig


def init_ray(cfg: RayConfig | None = None, **kwargs) -> None:
    """Join the cluster a job was submitted to (``RAY_ADDRESS``), the configured address, or start
    a local one. A no-op if Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=False, **kwargs)
