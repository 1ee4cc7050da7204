"""Application builders: ``BPOConfig`` -> bound Serve applications.

``build_model_app`` / ``build_judge_app`` are the import paths ``serve/config.yaml`` names (``serve
run`` / ``serve deploy`` call them with the YAML ``args``); ``bpo-ray serve`` calls the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from bpo_ray import storage
from bpo_ray.config import BPOConfig, load_config


def absolute_if_local(uri: str) -> str:
    """Existing local paths become absolute (replicas may run in another working dir); URIs and
    hub ids are returned unchanged."""
    if storage.is_remote(uri) or uri.startswith("file://"):
        return uri
    path = Path(uri).expanduser()
    return str(path.resolve()) if path.exists() else uri


def config_from_app_args(args: Optional[dict[str, Any]]) -> BPOConfig:
    """``{config: tiny, overrides: [k=v, ...], adapters: {name: uri}}`` -> a config with paths resolved."""
    args = dict(args or {})
    unknown = set(args) - {"config", "overrides", "adapters"}
    if unknown:
        raise ValueError(f"unknown app args {sorted(unknown)} (known: config, overrides, adapters)")
    cfg = load_config(args.get("config", "tiny"), list(args.get("overrides") or []))
    return with_adapters(cfg, dict(args.get("adapters") or {}))


def with_adapters(cfg: BPOConfig, adapters: dict[str, str]) -> BPOConfig:
    """A copy of ``cfg`` serving these extra adapters, with local paths made absolute."""
    cfg = cfg.model_copy(deep=True)
    model = cfg.serve.model
    model.adapters = {name: absolute_if_local(uri) for name, uri in {**model.adapters, **adapters}.items()}
    cfg.models.mllm = absolute_if_local(cfg.models.mllm)
    judge_cache = Path(cfg.serve.judge.cache_path).expanduser()
    cfg.serve.judge.cache_path = str(judge_cache if judge_cache.is_absolute() else judge_cache.resolve())
    return cfg


def model_application(cfg: BPOConfig, runtime_env: Optional[dict] = None):
    from bpo_ray.serving.model_app import build_model_application

    return build_model_application(cfg.models.mllm, cfg.serve.model, dtype=cfg.models.dtype, device=cfg.models.device,
                                   cache_dir=cfg.models.cache_dir, runtime_env=runtime_env)


def judge_application(cfg: BPOConfig, runtime_env: Optional[dict] = None):
    from bpo_ray.serving.judge.proxy import build_judge_application

    return build_judge_application(cfg.serve.judge, runtime_env=runtime_env)


def build_model_app(args: Optional[dict[str, Any]] = None):
    """``import_path: bpo_ray.serving.apps:build_model_app`` (Serve config file)."""
    return model_application(config_from_app_args(args))


def build_judge_app(args: Optional[dict[str, Any]] = None):
    """``import_path: bpo_ray.serving.apps:build_judge_app`` (Serve config file)."""
    return judge_application(config_from_app_args(args))
