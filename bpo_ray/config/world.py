"""Config of the bias world (the synthetic embedded-default data set and its base model)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from bpo_ray.config.base import StrictModel


class BaseModelConfig(StrictModel):
    """The base-model recipe (``bpo_ray.world.base_model``): sizes, step counts, learning rates.

    Every field keys the recipe's cache. The defaults (about 4 minutes on 2 CPU cores) give a
    model that describes what it sees yet hallucinates where its 2x2 patches see objects poorly
    (CHAIR_i about 0.26) and answers about 4 in 5 existence questions right (POPE F1 0.74-0.80);
    see docs/world.md, "Measured".
    """

    # model sizes (bpo_ray.models.tiny.TinySpec); vLLM's CPU attention needs lm_hidden/lm_heads >= 32
    lm_hidden: int = Field(128, ge=32)
    lm_layers: int = Field(2, ge=1)
    lm_heads: int = Field(4, ge=1)
    lm_intermediate: int = Field(256, ge=8)
    vision_hidden: int = Field(64, ge=8)
    vision_layers: int = Field(2, ge=2, description="LLaVA reads the second-to-last layer")
    vision_heads: int = Field(2, ge=1)
    patch_size: int = Field(24, ge=0, description="vision patch in pixels; 24 on the 48-px images gives 2x2 patches that "
                            "each straddle 1.5 grid cells (weak evidence off the corners); 0: image_size // 3, one patch per cell")
    vocab_size: int = Field(2048, ge=300, description="upper bound; the world's words need ~600")
    # 1. language pretraining: the prior (Vicuna's role)
    pretrain_steps: int = Field(300, ge=1)
    pretrain_batch_size: int = Field(16, ge=1)
    pretrain_lr: float = Field(3e-3, gt=0)
    max_length: int = Field(256, ge=16, description="pretraining window in tokens")
    chat_share: float = Field(0.5, ge=0, le=1, description="share of prior captions written as chat turns")
    injection_documents: int = Field(3000, ge=0, description="Table-1 error-injection documents")
    reading_documents: int = Field(0, ge=0, description="reading-comprehension documents (existence Q&A on a caption)")
    # 2. vision pretraining (stands in for CLIP's; ours starts from random weights)
    vision_steps: int = Field(150, ge=1)
    vision_batch_size: int = Field(64, ge=1)
    vision_lr: float = Field(3e-3, gt=0)
    # 3. feature alignment (LLaVA stage 1): the projector onto the LM's word embeddings
    projector_steps: int = Field(300, ge=1)
    projector_lr: float = Field(3e-3, gt=0)
    # 4. instruction alignment (LLaVA stage 2, kept short so the prior survives)
    existence_steps: int = Field(1200, ge=0, description="first, existence questions only (0: skip)")
    existence_questions: int = Field(20000, ge=1, description="existence questions drawn for that first step")
    align_share: float = Field(1.0, gt=0, le=1, description="share of train scenes used")
    existence_share: float = Field(0.5, ge=0, lt=1, description="share of extra existence questions in the mix")
    align_text_share: float = Field(0.0, ge=0, lt=1, description="share of each alignment batch that is text-only prior chat (LLaVA-1.5 mixes in ShareGPT text)")
    align_steps: int = Field(1500, ge=1)
    align_batch_size: int = Field(32, ge=1)
    align_lr: float = Field(1e-3, ge=0, description="projector")
    align_lm_lr: float = Field(2e-3, ge=0, description="language model; 0 freezes it")
    warmup_steps: int = Field(20, ge=1)

    @field_validator("lm_heads")
    @classmethod
    def _head_dim_for_vllm(cls, heads: int, info) -> int:
        hidden = info.data.get("lm_hidden", 128)
        if hidden % heads or hidden // heads < 32:
            raise ValueError(f"lm_hidden {hidden} / lm_heads {heads} must be a whole head_dim >= 32 (vLLM CPU attention)")
        return heads


class WorldEvalConfig(StrictModel):
    """How ``bpo-ray world build`` measures the base model (CHAIR, POPE, noise curve)."""

    split: str = "test"
    noise_steps: list[int] = Field(default_factory=lambda: [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999])
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(96, ge=8)

    @field_validator("noise_steps")
    @classmethod
    def _steps_in_schedule(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 0 <= s < 1000 for s in steps):
            raise ValueError(f"noise steps must lie in [0, 1000), got {steps}")
        return sorted(set(steps))


class WorldConfig(StrictModel):
    out: str = "runs/tiny/world"
    seed: int = 0
    n_scenes: int = Field(3000, ge=10)
    image_size: int = Field(48, ge=16, description="square image side in pixels; a multiple of world.base_model.patch_size")
    corpus_lines: int = Field(20000, ge=1)
    train_partner_rate: float = Field(0.0, ge=0, le=1, description="train scenes get each present kind's prior "
                                      "partner with this probability (as COCO's images co-occur); val/test stay independent")
    models_out: Optional[str] = Field(None, description="base models' directory (default: <out>/../models)")
    base_model: BaseModelConfig = BaseModelConfig()
    eval: WorldEvalConfig = WorldEvalConfig()
