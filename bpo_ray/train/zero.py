"""DeepSpeed ZeRO configs: the JSON files in ``bpo_ray/train/deepspeed/`` with their ``"auto"`` values
filled from the train config and the actual number of workers (which can change between restarts
of an elastic run)."""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from bpo_ray import storage
from bpo_ray.config.train import TrainConfig

#: Shipped inside the package (the checkout's ``cluster/deepspeed/`` links here).
DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"


#: DeepSpeed's Muon optimizer; ZeRO imports it in every process (see ``import_deepspeed``).
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed():
    """``deepspeed``, set up for a training worker (call before ``deepspeed.initialize``).

    Its shared-memory comm op is marked incompatible: its JIT build costs minutes on CPU. And its
    Muon optimizer module is imported with ``torch.compile`` as the identity: ZeRO imports that
    module in every process (``deepspeed.runtime.zero.utils.is_zero_supported_optimizer`` during
    ``deepspeed.initialize``, stage 1-2's ``average_tensor`` in backward), and its three
    ``@torch.compile`` decorators import TorchInductor there, 1.5-2 CPU-s per worker for an
    optimizer this trainer never uses (the loop always hands DeepSpeed torch's AdamW). The Muon
    functions stay plain Python; nothing this trainer runs changes. Where DeepSpeed's layout
    differs (no such module, no ``runtime.compiler.compile``), DeepSpeed imports it as usual.
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if MUON_MODULE not in sys.modules:
        try:
            from deepspeed.runtime import compiler
        except ImportError:
            return deepspeed
        compile_decorator = getattr(compiler, "compile", None)
        if compile_decorator is not None:
            compiler.compile = lambda: (lambda fn: fn)
            try:
                importlib.import_module(MUON_MODULE)
            except ImportError:
                pass  # DeepSpeed tolerates a missing Muon too
            finally:
                compiler.compile = compile_decorator
    return deepspeed


class ZeroConfigError(ValueError):
    """The DeepSpeed config is missing or disagrees with the train config."""


def deepspeed_config_path(train: TrainConfig) -> str:
    """``train.deepspeed_config`` or ``bpo_ray/train/deepspeed/zero<stage>.json`` (stages 0-1 use zero2.json's
    settings with their own stage number)."""
    if train.deepspeed_config:
        return train.deepspeed_config
    if train.zero_stage not in (0, 1, 2, 3):
        raise ZeroConfigError(f"ZeRO stage {train.zero_stage} does not exist (use 0, 1, 2 or 3)")
    return str(DEEPSPEED_DIR / f"zero{max(train.zero_stage, 2)}.json")


def load_deepspeed_template(train: TrainConfig) -> dict[str, Any]:
    """Read the DeepSpeed JSON for ``train`` (driver side) and check its ZeRO stage."""
    path = deepspeed_config_path(train)
    try:
        data = json.loads(storage.read_text(path))
    except (storage.StorageError, json.JSONDecodeError) as exc:
        raise ZeroConfigError(f"cannot read DeepSpeed config {path}: {exc}") from exc
    zero = data.setdefault("zero_optimization", {})
    stage = zero.get("stage", train.zero_stage)
    if train.deepspeed_config and stage != train.zero_stage:
        raise ZeroConfigError(f"{path} sets ZeRO stage {stage} but train.zero_stage is {train.zero_stage}")
    zero["stage"] = train.zero_stage
    return data


def fill_deepspeed_config(template: dict[str, Any], train: TrainConfig, world_size: int) -> dict[str, Any]:
    """Replace ``"auto"`` values: micro batch, accumulation, global batch, clipping, bf16."""
    cfg = copy.deepcopy(template)
    autos = {
        "train_micro_batch_size_per_gpu": train.per_device_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.per_device_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in autos.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = train.precision == "bf16"
    if cfg["train_batch_size"] != cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size:
        raise ZeroConfigError("DeepSpeed train_batch_size must equal micro batch x grad_accum x workers")
    return cfg
