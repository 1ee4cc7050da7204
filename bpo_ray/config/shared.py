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
    """How to reach Ray (``bpo_ray.raycluster.init_ray``): a set ``address`` joins that cluster;
    otherwise ``RAY_ADDRESS`` (``ray job submit`` sets it) is joined, else a fresh local instance
    starts, even when ``ray start`` runs on this machine."""

    address: Optional[str] = Field(None, description="cluster to join: host:port, ray://host:port, or 'auto' "
                                   "(the cluster `ray start` started on this machine); null: RAY_ADDRESS or a fresh local instance")
    num_cpus: Optional[int] = Field(None, ge=1, description="only for a local cluster")
    namespace: str = "bpo-ray"


class NumericsConfig(StrictModel):
    """CPU kernel pinning for bit-reproducible runs across CPUs of one machine kind (``bpo_ray.numerics``)."""

    cpu_isa: Literal["avx2", "compatible", "native"] = Field(
        "native", description="avx2: every stage process uses AVX2 kernels (ATen, oneDNN, MKL), so AVX2 and "
        "AVX-512 CPUs of one maker give the same bits (MKL's AVX2 branch exists on Intel CPUs only: AMD CPUs run "
        "its AUTO branch, and the bits differ between the two makers); compatible: as avx2 but MKL's COMPATIBLE "
        "(SSE2) branch, the one Intel documents for Intel and non-Intel CPUs alike, slower GEMMs; "
        "native: whatever the CPU offers (GPU clusters)")
    threads: Optional[int] = Field(None, ge=1, description="intra-op threads of single-process work (the world "
                                   "recipe); null: every core of the process's affinity")


class StorageConfig(StrictModel):
    """Output root; local path or ``s3://bucket/prefix``. Credentials always come from the env."""

    root: str = "runs/tiny"
