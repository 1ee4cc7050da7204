"""Transformers-side LLaVA inference on (possibly weakened) image embeddings.

The image passes through the vision tower and projector once; the resulting features, noised
or not, are written into the prompt's ``<image>`` positions of ``inputs_embeds``. Generation runs
from those embeddings, so the KV cache holds the weakened image and every generated token is
conditioned on it (not only the first, as when noise is applied to pixels per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

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
def generate_from_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor,
                           sampling, pad_token_id: int, eos_token_id: int, seed: Optional[int] = None,
                           output_logits: bool = False):
    """``model.generate`` from prompt embeddings whose ``<image>`` slots hold ``features`` (clean or
    noised: BPO's image-weakened prompting conditions every generated token on them).

    ``sampling`` has ``max_new_tokens``, ``temperature`` (0 = greedy) and ``top_p`` (``Sampling``
    or the generate config's ``SamplingConfig``). Returns the generate output: ``sequences`` hold
    only the new tokens (``decode_answers``), ``logits`` per step when ``output_logits``.
    """
    embeds = merge_image_features(model, input_ids, features)
    kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_token_id,
                                  eos_token_id=eos_token_id, return_dict_in_generate=True,
                                  output_logits=output_logits)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(model.device), **kwargs)


def decode_answers(tokenizer, out) -> list[str]:
    """The answers of a ``generate_from_features`` output, stripped."""
    return [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
