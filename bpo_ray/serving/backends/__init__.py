"""Model backends behind one interface (``GenerationBackend``): vLLM, or transformers + peft."""

from __future__ import annotations

from typing import Optional

from bpo_ray.serving.backends.base import GenerationBackend, GenerationResult, TextDelta


def make_backend(kind: str, model_path: str, adapters: Optional[dict[str, str]] = None, *, dtype: str = "float32",
                 device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models",
                 max_model_len: int = 1024) -> GenerationBackend:
    """Build the configured backend (``serve.model.backend``: ``vllm`` or ``transformers``)."""
    if kind == "vllm":
        from bpo_ray.serving.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model_path, adapters, max_model_len=max_model_len, cache_dir=cache_dir)
    if kind == "transformers":
        from bpo_ray.serving.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model_path, adapters, dtype=dtype, device=device, cache_dir=cache_dir)
    raise ValueError(f"unknown backend {kind!r} (vllm | transformers)")


__all__ = ["GenerationBackend", "GenerationResult", "TextDelta", "make_backend"]
