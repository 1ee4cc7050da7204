"""Transformers-side LLaVA inference on (possibly weakened) image embeddings.

The image passes through the vision tower and projector once; the resulting features, noised
or not, are written into the prompt's ``<image>`` positions of ``inputs_embeds``. Generation runs
from those embeddings, so the KV cache holds the weakened image and every generated token is
conditioned on it (not only the first, as when noise is applied to pixels per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0


@torch.no_grad()
def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Post-projector image features, ``(n_images, n_image_tokens, lm_hidden)``."""
    cfg = model.config
    out = model.get_image_features(
        pixel_values=pixel_values.to(model.device, model.dtype),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        return_dict=True,
    )
    feats = out.pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def encode_prompts(processor, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """Tokenise LLaVA prompts (``<image>`` expanded) with left padding, plus pixel values."""
    processor.tokenizer.padding_side = "left"
    return processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)


def merge_image_features(model, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the ``<image>`` positions replaced by ``features`` (row-major)."""
    embeds = model.get_input_embeddings()(input_ids.to(model.device))
    mask = (input_ids == model.config.image_token_id).to(model.device)
    n_slots, n_feats = int(mask.sum()), features.shape[0] * features.shape[1]
    if n_slots != n_feats:
        raise ValueError(f"prompt has {n_slots} image positions but features fill {n_feats}")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))


@torch.no_grad()
def generate_from_features(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    features: torch.Tensor,
    sampling: Sampling = Sampling(),
    seed: Optional[int] = None,
) -> list[str]:
    """Generate answers from prompts whose image slots hold ``features`` (clean or noised)."""
    embeds = merge_image_features(model, input_ids, features)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(model.device), **kwargs)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
