"""Config of the generate stage (paper section 3.1)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from bpo_ray.config.base import StrictModel


class PoolConfig(StrictModel):
    """An autoscaling Ray Data actor pool; fractional CPUs/GPUs are allowed."""

    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)


class NoiseConfig(StrictModel):
    """DDPM forward-noise schedule on image embeddings (VCD's schedule, DESIGN.md)."""

    num_steps: int = Field(1000, ge=1, description="T")
    steps: list[int] = Field(default_factory=lambda: [500], description="t values to sample at")

    @field_validator("steps")
    @classmethod
    def _steps_in_range(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v):
            raise ValueError("need at least one non-negative noise step")
        return v


class SamplingConfig(StrictModel):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class SamplerConfig(StrictModel):
    backend: Literal["transformers", "vllm"] = "transformers"
    noise: NoiseConfig = NoiseConfig()
    sampling: SamplingConfig = SamplingConfig()
    pool: PoolConfig = PoolConfig()


class InjectorConfig(StrictModel):
    backend: Literal["transformers", "vllm"] = "transformers"
    sampling: SamplingConfig = SamplingConfig(temperature=0.8, top_p=0.95)
    pool: PoolConfig = PoolConfig()


class JudgeRankedConfig(StrictModel):
    judge_url: Optional[str] = None
    judge_model: str = "gpt-4"
    num_samples: int = Field(4, ge=2)
    min_score_gap: float = Field(2.0, ge=0)


class FilterConfig(StrictModel):
    min_chars: int = Field(1, ge=0)
    max_length_ratio: float = Field(4.0, gt=1)


class GenerateConfig(StrictModel):
    strategies: list[Literal["image_weakened", "error_injection", "judge_ranked"]] = Field(
        default_factory=lambda: ["image_weakened", "error_injection"]
    )
    seed: int = 0
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    sampler: SamplerConfig = SamplerConfig()
    injector: InjectorConfig = InjectorConfig()
    judge_ranked: JudgeRankedConfig = JudgeRankedConfig()
    filters: FilterConfig = FilterConfig()
