"""Config of the evaluate stage."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from bpo_ray.config.base import StrictModel


class EvaluateConfig(StrictModel):
    benchmarks: list[Literal["chair", "pope", "mmvet", "llava_bench"]] = Field(
        default_factory=lambda: ["chair", "pope"]
    )
    data: dict[str, str] = Field(default_factory=dict, description="benchmark -> local/s3 path of its data")
    max_items: Optional[int] = Field(None, ge=1)
    concurrency: int = Field(4, ge=1)
    max_tokens: int = Field(64, ge=1)
    judge_model: str = "gpt-4"
