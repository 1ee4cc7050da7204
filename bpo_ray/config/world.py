"""Config of the bias world (the synthetic embedded-default data set and its base model)."""

from __future__ import annotations

from pydantic import Field

from bpo_ray.config.base import StrictModel


class WorldConfig(StrictModel):
    out: str = "runs/tiny/world"
    seed: int = 0
    n_scenes: int = Field(3000, ge=10)
    image_size: int = Field(32, ge=16)
