"""Config of the train stage (paper Eq. 4, LoRA, DeepSpeed ZeRO, Ray Train)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from bpo_ray.config.base import StrictModel


class LoraConfig(StrictModel):
    """LoRA on the language model's linear layers (``target_modules`` are their short names).

    ``train_projector`` also puts LoRA on the multimodal projector's linear layers. PEFT loads such
    adapters; vLLM 0.32 cannot apply LoRA to LLaVA's connector (its tower-LoRA path fails on the
    CLS position), so serve them from the merged model (``train.merge: true``). The vision tower
    always stays frozen.
    """

    rank: int = Field(64, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    train_projector: bool = False


VALIDATION_METRICS = {"reward_accuracy": "max", "reward_margin": "max", "loss": "min", "chosen_logp_delta": "max"}


class ValidationConfig(StrictModel):
    """Held-out pairs evaluated during training (docs/train.md, "Validation and collapse").

    Off unless ``fraction`` or ``n_pairs`` is set; then those pairs (chosen by a hash of their id,
    the same on every run and resume) are left out of training and evaluated every ``every_steps``
    optimizer steps and at the last step.
    """

    fraction: float = Field(0.0, ge=0, lt=1, description="share of the kept pairs held out (0: off)")
    n_pairs: Optional[int] = Field(None, ge=1, description="or: this many pairs held out")
    seed: int = Field(0, description="salt of the id hash that picks the held-out pairs")
    every_steps: int = Field(10, ge=1)
    metric: Literal["reward_accuracy", "reward_margin", "loss", "chosen_logp_delta"] = "reward_accuracy"
    mode: Optional[Literal["max", "min"]] = Field(None, description="better is max or min; default by metric "
                                                  "(loss: min, the others: max)")
    keep_best: bool = Field(True, description="export the best validated adapter as OUT/adapter "
                            "(the last one goes to OUT/adapter_last)")
    chosen_drop_warn: Optional[float] = Field(2.0, gt=0, description="warn when the held-out chosen log-prob "
                                              "falls this many nats (mean per pair) below the reference")
    chosen_drop_stop: Optional[float] = Field(None, gt=0, description="stop training (checkpoint and export) "
                                              "when it falls this far")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or self.n_pairs is not None

    @property
    def direction(self) -> str:
        return self.mode or VALIDATION_METRICS[self.metric]

    @model_validator(mode="after")
    def _consistent(self) -> "ValidationConfig":
        if self.fraction > 0 and self.n_pairs is not None:
            raise ValueError(f"set fraction ({self.fraction}) or n_pairs ({self.n_pairs}), not both")
        if self.chosen_drop_stop is not None and self.chosen_drop_warn is not None \
                and self.chosen_drop_stop < self.chosen_drop_warn:
            raise ValueError(f"chosen_drop_stop ({self.chosen_drop_stop}) is below chosen_drop_warn "
                             f"({self.chosen_drop_warn}): training would stop before it warns")
        return self


class TrainConfig(StrictModel):
    mode: Literal["dpo", "sft"] = "dpo"
    loss: Literal["sigmoid", "ipo", "hinge", "conservative"] = "sigmoid"
    beta: float = Field(0.1, gt=0, description="DPO beta (paper Eq. 4's eta)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    average_logp: bool = False
    sft_weight: float = Field(0.0, ge=0, description="dpo mode: + this times the chosen answers' per-token NLL "
                              "(TRL's rpo_alpha); keeps DPO from lowering the likelihood of the ground truth")
    lora: LoraConfig = LoraConfig()
    lr: float = Field(2e-6, gt=0)
    epochs: float = Field(2.0, gt=0)
    per_device_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_length: int = Field(2048, ge=16)
    zero_stage: int = 2
    num_workers: Union[int, tuple[int, int]] = 2
    launcher: Literal["ray_train", "local"] = Field(
        "ray_train", description="ray_train: Ray Train's controller starts num_workers worker processes "
        "(placement group, restarts up to max_failures, elastic resize, multi-node); local: the same training "
        "function in this process as the only worker, without Ray (seconds instead of Ray Train's ~10 s start, "
        "no Ray imports); no restarts: rerunning resumes from the latest checkpoint (bpo_ray/train/local_launch.py)")
    use_gpu: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = Field(50, ge=1)
    max_failures: int = Field(3, ge=0)
    seed: int = 0
    merge: bool = False
    log_every: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="stop (with a checkpoint) after this many optimizer steps")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 turns it off")
    checkpoints_to_keep: int = Field(2, ge=1)
    poll_interval_s: float = Field(0.25, gt=0, description="how often Ray Train's controller polls the workers "
                                   "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2 s): a run's end and each "
                                   "checkpoint report wait for polls (bpo_ray/train/ray_settings.py)")
    use_precomputed_reference: bool = Field(True, description="use ref_*_logp columns when every pair has them")
    strategies: Optional[list[Literal["image_weakened", "error_injection", "judge_ranked", "on_policy"]]] = Field(
        None, description="train only on pairs whose negative came from these strategies (null: all)")
    noise_steps: Optional[list[int]] = Field(
        None, description="train only on image-weakened pairs from these diffusion steps (null: all); the paper's "
        "Table 5 ablation without weakening is [0]. Other strategies' pairs are kept")
    deepspeed_config: Optional[str] = Field(None, description="DeepSpeed JSON; default bpo_ray/train/deepspeed/zero<stage>.json")
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.loss == "conservative" and self.label_smoothing == 0:
            raise ValueError("loss 'conservative' (label-smoothed DPO) needs label_smoothing in (0, 0.5)")
        if self.loss != "conservative" and self.label_smoothing > 0:
            raise ValueError(f"label_smoothing applies to loss 'conservative' only, not {self.loss!r}")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision bf16 needs use_gpu: true (CPU training runs in fp32)")
        if self.launcher == "local" and self.num_workers != 1:
            raise ValueError(f"launcher 'local' runs one worker, in this process, so num_workers must be 1, not "
                             f"{self.num_workers} (--set train.num_workers=1); or use launcher 'ray_train'")
        return self

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
    batch_size: int = Field(8, ge=1, description="pairs per forward; 1 scores each pair alone, so its log-probs do not "
                            "depend on its batch-mates' padding (bit-reproducible; the embedded default)")
    launcher: Literal["ray_data", "local"] = Field(
        "ray_data", description="ray_data: a Ray Data job, num_actors scorer actors; local: the same scorer in "
        "this process (no Ray start, no actor start; num_actors/num_cpus/num_gpus do not apply)")
    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    out: Optional[str] = None
