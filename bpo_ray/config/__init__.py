"""Typed, validated configs: one shared part plus one section per stage.

``load_config("configs/tiny.yaml", overrides=["train.beta=0.2"])`` returns a ``BPOConfig``;
a bad key or value raises ``ConfigError`` naming the key path and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import ValidationError

from bpo_ray.config.base import ConfigError, StrictModel, apply_overrides, format_validation_error, read_yaml
from bpo_ray.config.evaluate import EvaluateConfig
from bpo_ray.config.generate import GenerateConfig
from bpo_ray.config.serve import ServeConfig
from bpo_ray.config.shared import ModelsConfig, NumericsConfig, RayConfig, StorageConfig
from bpo_ray.config.train import ReferenceConfig, TrainConfig
from bpo_ray.config.world import WorldConfig

#: The named configs ship inside the package (``bpo_ray/configs/``; the checkout's ``configs/`` links there).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class BPOConfig(StrictModel):
    """The whole configuration; every stage reads the shared part and its own section."""

    name: str = "custom"
    models: ModelsConfig = ModelsConfig()
    ray: RayConfig = RayConfig()
    numerics: NumericsConfig = NumericsConfig()
    storage: StorageConfig = StorageConfig()
    world: WorldConfig = WorldConfig()
    generate: GenerateConfig = GenerateConfig()
    reference: ReferenceConfig = ReferenceConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def resolve_config_path(name_or_path: str) -> str:
    """``tiny`` -> ``bpo_ray/configs/tiny.yaml``; any existing path or URI is returned unchanged."""
    if "://" in name_or_path or Path(name_or_path).exists():
        return name_or_path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return str(named)
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or named config {name_or_path!r} (named configs: {', '.join(known)})")


def config_from_dict(data: dict[str, Any], overrides: Iterable[str] = ()) -> BPOConfig:
    data = apply_overrides(data, overrides)
    try:
        return BPOConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, BPOConfig, data)) from None


def load_config(path: Optional[str] = "tiny", overrides: Iterable[str] = ()) -> BPOConfig:
    """Load a YAML config (a path, URI or named config) and apply ``key.path=value`` overrides."""
    data = read_yaml(resolve_config_path(path)) if path else {}
    return config_from_dict(data, overrides)


def dump_config(cfg: BPOConfig) -> str:
    """YAML text that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "BPOConfig", "ConfigError", "StrictModel", "load_config", "config_from_dict", "dump_config",
    "resolve_config_path", "ModelsConfig", "NumericsConfig", "RayConfig", "StorageConfig", "WorldConfig",
    "GenerateConfig", "TrainConfig", "ReferenceConfig", "ServeConfig", "EvaluateConfig",
]
