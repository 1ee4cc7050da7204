"""Config of the train stage (paper Eq. 4, LoRA, DeepSpeed ZeRO, Ray Train)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator

from bpo_ray.config.base import StrictModel


class LoraConfig(StrictModel):
    rank: int = Field(64, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    train_projector: bool = False


class TrainConfig(StrictModel):
    mode: Literal["dpo", "sft"] = "dpo"
    loss: Literal["sigmoid", "ipo", "hinge", "conservative"] = "sigmoid"
    beta: float = Field(0.1, gt=0, description="DPO beta (paper Eq. 4's eta)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    average_logp: bool = False
    lora: LoraConfig = LoraConfig()
    lr: float = Field(2e-6, gt=0)
    epochs: float = Field(2.0, gt=0)
    per_device_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_length: int = Field(2048, ge=16)
    zero_stage: int = 2
    num_workers: Union[int, tuple[int, int]] = 2
    use_gpu: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = Field(50, ge=1)
    max_failures: int = Field(3, ge=0)
    seed: int = 0
    merge: bool = False
    log_every: int = Field(1, ge=1)

    @field_validator("zero_stage")
    @classmethod
    def _zero_stage_exists(cls, v: int) -> int:
        if v not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage {v} does not exist (use 0, 1, 2 or 3)")
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        if isinstance(v, tuple):
            lo, hi = v
            if not 1 <= lo <= hi:
                raise ValueError("num_workers range must satisfy 1 <= min <= max")
        elif v < 1:
            raise ValueError("num_workers must be >= 1")
        return v


class ReferenceConfig(StrictModel):
    batch_size: int = Field(8, ge=1)
    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    out: Optional[str] = None
