"""Config sections shared by every stage: models, Ray, storage."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from bpo_ray.config.base import StrictModel


class ModelsConfig(StrictModel):
    """Where the models live. Paths may be local dirs, ``s3://`` URIs or (on clusters) hub ids."""

    mllm: str = Field("runs/tiny/models/llava", description="LLaVA-architecture MLLM checkpoint")
    text_llm: str = Field("runs/tiny/models/text_lm", description="text LLM used for error injection")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str = Field("~/.cache/bpo-ray/models", description="local cache for s3:// models")


class RayConfig(StrictModel):
    """How to reach Ray. ``address=None`` starts (or joins) a local cluster."""

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1, description="only for a local cluster")
    namespace: str = "bpo-ray"


class StorageConfig(StrictModel):
    """Output root; local path or ``s3://bucket/prefix``. Credentials always come from the env."""

    root: str = "runs/tiny"
