"""Start and stop the serve stage's applications on the current Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from bpo_ray.config import BPOConfig

MODEL_APP = "model"
JUDGE_APP = "judge"


@dataclass(frozen=True)
class ServingURLs:
    model: Optional[str]
    judge: Optional[str]


def base_url(host: str, port: int, route_prefix: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix}"


def start_serving(cfg: BPOConfig, apps: Sequence[str] = (MODEL_APP, JUDGE_APP),
                  runtime_env: Optional[dict] = None) -> ServingURLs:
    """Deploy the named apps (``cfg`` paths already resolved, see ``apps.with_adapters``) and wait
    until they answer. Serve's HTTP proxy binds ``serve.host:serve.port``."""
    from ray import serve

    from bpo_ray.raycluster import worker_runtime_env
    from bpo_ray.serving.apps import judge_application, model_application

    s = cfg.serve
    if runtime_env is None:
        runtime_env = worker_runtime_env(cfg.numerics)
    serve.start(http_options={"host": s.host, "port": s.port})
    targets = []
    if MODEL_APP in apps:
        targets.append(serve.RunTarget(model_application(cfg, runtime_env), name=MODEL_APP,
                                       route_prefix=s.model.route_prefix))
    if JUDGE_APP in apps:
        targets.append(serve.RunTarget(judge_application(cfg, runtime_env), name=JUDGE_APP,
                                       route_prefix=s.judge.route_prefix))
    serve.run_many(targets)
    return ServingURLs(
        model=base_url(s.host, s.port, s.model.route_prefix) if MODEL_APP in apps else None,
        judge=base_url(s.host, s.port, s.judge.route_prefix) if JUDGE_APP in apps else None,
    )


def stop_serving(apps: Sequence[str] = (MODEL_APP, JUDGE_APP)) -> None:
    """Delete the named apps (other Serve apps on the cluster keep running)."""
    from ray import serve

    for name in apps:
        if name in serve.status().applications:
            serve.delete(name)
