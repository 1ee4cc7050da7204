"""LoRA on the MLLM's language model (and optionally its projector); the reference is the same
model with the adapter switched off, so no second copy is ever held (BPO paper section 4.3).

Targets are given by short names (``q_proj``, ``down_proj``, ...) and resolved here to the full
names of ``nn.Linear`` layers inside the language model only: CLIP's vision tower has its own
``q_proj``/``k_proj``/``v_proj`` that must stay frozen. Resolving to full names also keeps the
adapter loadable by vLLM, which reads module names from the saved tensors.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from torch import nn

from bpo_ray.config.train import LoraConfig

LANGUAGE_MODEL = "language_model"
PROJECTOR = "multi_modal_projector"


class TargetModuleError(ValueError):
    """Configured LoRA targets that the language model does not have."""


def _submodule_prefix(model: nn.Module, name: str) -> str:
    matches = sorted((n for n, _ in model.named_modules() if n.split(".")[-1] == name), key=len)
    if not matches:
        raise TargetModuleError(f"model {type(model).__name__} has no '{name}' submodule")
    return matches[0]


def linear_layers(model: nn.Module, under: str) -> dict[str, list[str]]:
    """Short name -> full names of the ``nn.Linear`` layers inside submodule ``under``."""
    prefix = _submodule_prefix(model, under) + "."
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, nn.Linear):
            out.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return out


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full module names to wrap with LoRA; raises ``TargetModuleError`` naming unknown targets."""
    available = linear_layers(model, LANGUAGE_MODEL)
    unknown = [t for t in cfg.target_modules if t not in available]
    if unknown:
        raise TargetModuleError(
            f"train.lora.target_modules {unknown} are not linear layers of the language model; "
            f"available: {', '.join(sorted(available))}"
        )
    targets = [name for t in cfg.target_modules for name in available[t]]
    if cfg.train_projector:
        targets += [n for names in linear_layers(model, PROJECTOR).values() for n in names]
    return sorted(set(targets))


def apply_lora(model: nn.Module, cfg: LoraConfig):
    """Wrap ``model`` in a ``PeftModel``: only the LoRA matrices are trainable afterwards."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=resolve_targets(model, cfg),
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


@contextlib.contextmanager
def reference_model(peft_model) -> Iterator[None]:
    """Inside this context ``peft_model`` computes the reference policy (adapter disabled)."""
    with peft_model.disable_adapter():
        yield


def set_base_model_uri(adapter_dir: str | Path, uri: str) -> None:
    """Record where the base model lives (its configured URI, not a node-local cache path)."""
    path = Path(adapter_dir) / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = uri
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
