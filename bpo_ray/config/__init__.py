"""Typed, validated configs: one shared part plus one section per stage.

``load_config("configs/tiny.yaml", overrides=["train.beta=0.2"])`` returns a ``BPOConfig``;
a bad key or value raises ``ConfigError`` naming the key path and the value. A config file may
start from another with ``base: <named config, path or URI>`` and set only what differs
(``configs/demo.yaml`` is ``tiny`` plus the demo's settings).
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


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: sections merge key by key, any other value (lists too) replaces,
    as a ``--set`` of each of ``top``'s values would."""
    out = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_sections else value
    return out


def _base_path(base: Any, including: str) -> str:
    """Where a ``base:`` points: a local path is read beside the file that names it first, then as
    ``--config`` reads it (a path from here, a URI, a named config)."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{including}: 'base' must name a config (a named config, path or URI), got {base!r}")
    if "://" not in base and "://" not in including:
        beside = Path(including).parent / base
        if beside.is_file():
            return str(beside)
    return resolve_config_path(base)


def _identity(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def read_config_file(path: str, _including: tuple[str, ...] = ()) -> dict[str, Any]:
    """The mapping a config file stands for: its ``base:`` chain merged, then the file's own keys."""
    data = read_yaml(path)
    if "base" not in data:
        return data
    base = _base_path(data.pop("base"), path)
    chain = (*_including, path)
    if _identity(base) in map(_identity, chain):
        raise ConfigError(f"config 'base' loop: {' -> '.join([*chain, base])}")
    return _merge(read_config_file(base, chain), data)


def load_config(path: Optional[str] = "tiny", overrides: Iterable[str] = ()) -> BPOConfig:
    """Load a YAML config (a path, URI or named config; see ``read_config_file`` for ``base:``) and
    apply ``key.path=value`` overrides."""
    data = read_config_file(resolve_config_path(path)) if path else {}
    return config_from_dict(data, overrides)


def dump_config(cfg: BPOConfig) -> str:
    """YAML text that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "BPOConfig", "ConfigError", "StrictModel", "load_config", "config_from_dict", "dump_config",
    "read_config_file", "resolve_config_path", "ModelsConfig", "NumericsConfig", "RayConfig", "StorageConfig", "WorldConfig",
    "GenerateConfig", "TrainConfig", "ReferenceConfig", "ServeConfig", "EvaluateConfig",
]


def config_differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    """``key.path: before -> now`` for every value that differs between two dumped configs (or
    parts of one). A key only one of them has is a setting the code gained or lost since, not a
    changed value: skipped."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return [] if before == now else [f"{prefix.rstrip('.')}: {before!r} -> {now!r}"]
    lines = []
    for key in sorted(set(before) & set(now), key=str):
        lines += config_differences(before[key], now[key], f"{prefix}{key}.")
    return lines

