"""Build tiny, random-init, HF-format checkpoints offline and deterministically.

``build_tiny_models(out)`` writes ``out/llava`` (CLIP vision tower + projector + Llama LM, the
``llava-hf/llava-1.5-7b-hf`` architecture at toy size, with its processor) and ``out/text_lm``
(a Llama LM with the same tokenizer: the error injector's LLM). Both load with
``from_pretrained`` in transformers and in vLLM, through ``bpo_ray.models.loading``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from bpo_ray.models.checkpoint import save_portable
from bpo_ray.models.prompts import IMAGE_TOKEN
from bpo_ray.models.tokenizer import train_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny models. vLLM's CPU attention needs head_dim = hidden/heads >= 32."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    lm_hidden: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_intermediate: int = 256
    vocab_size: int = 2048
    max_positions: int = 1024

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _text_config(spec: TinySpec, vocab: int, tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.lm_hidden,
        intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers,
        num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_models(
    out: str | Path,
    seed: int = 0,
    spec: TinySpec = TinySpec(),
    corpus: Optional[Iterable[str]] = None,
) -> dict[str, str]:
    """Write a tiny LLaVA and a tiny text LM under ``out``; returns their paths.

    ``corpus`` (texts) trains the shared tokenizer; the default is a small built-in text.
    Identical inputs give identical weights and tokenizer files.
    """
    out = Path(out)
    torch.manual_seed(seed)
    tok = train_tokenizer(corpus or [], vocab_size=spec.vocab_size)
    vocab = len(tok)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(spec, vocab, tok),
        image_token_index=image_token_id,
        image_seq_length=spec.image_seq_length,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    mllm = LlavaForConditionalGeneration(cfg).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    llava_dir = out / "llava"
    save_portable(mllm, processor, llava_dir)

    torch.manual_seed(seed + 1)
    text_lm = LlamaForCausalLM(_text_config(spec, vocab, tok)).eval()
    text_dir = out / "text_lm"
    save_portable(text_lm, tok, text_dir)

    meta = {"seed": seed, "spec": asdict(spec), "vocab_size": vocab}
    (out / "tiny.json").write_text(json.dumps(meta, indent=2))
    return {"mllm": str(llava_dir), "text_llm": str(text_dir)}
