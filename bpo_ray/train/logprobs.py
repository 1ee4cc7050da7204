"""Answer-token log-probabilities of LLaVA-style pairs, chosen and rejected in one forward pass.

A pair becomes two sequences that share the prompt (``<s> USER: <image>... ASSISTANT:``, the
``<image>`` placeholder expanded to the image's tokens) and end in the chosen or the rejected
answer plus ``</s>``. Only answer tokens are scored; prompt and image positions are masked. A
sequence longer than ``max_length`` loses the end of its answer, never an image token: a prompt
that alone leaves no room for an answer is refused (``PromptTooLong``) and the caller drops the
pair, counted.

``collate_pairs`` stacks ``B`` pairs into one batch of ``2B`` rows, ``[chosen_1..B, rejected_1..B]``
with the images repeated, so the policy (and the reference, when it is not precomputed) runs once
per step instead of twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from bpo_ray.models.prompts import pair_prompt


class PromptTooLong(ValueError):
    """The prompt (with its image tokens) leaves no room for an answer within ``max_length``."""


@dataclass
class EncodedPair:
    """Token ids of one pair; ``*_answer_ids`` end with ``</s>`` unless truncated."""

    prompt_ids: list[int]
    chosen_answer_ids: list[int]
    rejected_answer_ids: list[int]
    pixel_values: torch.Tensor  # (1, channels, height, width)


def answer_ids(full: list[int], prompt: list[int], tokenizer, answer: str) -> list[int]:
    """The answer's token ids after ``prompt`` in ``full`` (prompt + answer tokenized together), plus EOS."""
    # Tokenising prompt+answer together gives the ids the model sees at inference; fall back to
    # the answer alone if a merge across the boundary changed the prompt's last token.
    if full[: len(prompt)] == prompt:
        ids = list(full[len(prompt):])
    else:
        ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def encode_pair(processor, image: Image.Image, prompt: str, chosen: str, rejected: str, max_length: int) -> EncodedPair:
    """Tokenise one pair; answers are cut at the end so ``len(prompt) + len(answer) <= max_length``."""
    text = pair_prompt(prompt)
    texts = [text, f"{text} {chosen.strip()}", f"{text} {rejected.strip()}"]
    enc = processor(images=[image] * 3, text=texts, padding=False)
    prompt_ids, full_chosen, full_rejected = (list(ids) for ids in enc["input_ids"])
    room = max_length - len(prompt_ids)
    if room < 1:
        raise PromptTooLong(f"prompt has {len(prompt_ids)} tokens (image tokens included), "
                            f"max_length is {max_length}")
    tok = processor.tokenizer
    chosen_ids = answer_ids(full_chosen, prompt_ids, tok, chosen)[:room]
    rejected_ids = answer_ids(full_rejected, prompt_ids, tok, rejected)[:room]
    pixel_values = torch.as_tensor(np.asarray(enc["pixel_values"][0]))[None]
    return EncodedPair(prompt_ids, chosen_ids, rejected_ids, pixel_values)


def collate_pairs(pairs: Sequence[EncodedPair], pad_token_id: int, with_rejected: bool = True) -> dict:
    """Right-padded batch of ``2B`` rows (chosen then rejected), or ``B`` chosen rows for SFT.

    Returns ``input_ids``/``attention_mask``/``answer_mask`` of shape ``(rows, seq_len)`` and
    ``pixel_values`` of shape ``(rows, channels, height, width)`` (each image repeated per row).
    """
    rows = [(p.prompt_ids, p.chosen_answer_ids, p.pixel_values) for p in pairs]
    if with_rejected:
        rows += [(p.prompt_ids, p.rejected_answer_ids, p.pixel_values) for p in pairs]
    seq_len = max(len(prompt) + len(answer) for prompt, answer, _ in rows)
    input_ids = torch.full((len(rows), seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, (prompt, answer, _) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer, dtype=torch.long)
        attention_mask[i, :n] = 1
        answer_mask[i, n_prompt:n] = 1
    pixel_values = torch.cat([pv for _, _, pv in rows], dim=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask,
            "pixel_values": pixel_values}


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token, and the mask of those that are answer tokens.

    Args:
        logits: ``(rows, seq_len, vocab)``; position ``t`` predicts token ``t + 1``.
        input_ids: ``(rows, seq_len)``.
        answer_mask: ``(rows, seq_len)``, 1 on answer tokens.

    Returns:
        ``(logps, mask)``, both ``(rows, seq_len - 1)``; ``logps`` is 0 where ``mask`` is 0.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].to(logits.device)
    mask = answer_mask[:, 1:].to(logits.device)
    # log_softmax gathered at the target, without materialising the whole (rows, T, V) result
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average``, mean; Li et al. 2024) of the answer-token log-probs, shape ``(rows,)``."""
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def forward_logps(model, batch: dict, average: bool = False, device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``model`` on a collated batch; returns ``(sequence_logps (rows,), token_logps, mask)``."""
    device = device or next(model.parameters()).device
    pixel_values = batch["pixel_values"].to(device)
    if dtype is not None:
        pixel_values = pixel_values.to(dtype)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        pixel_values=pixel_values,
        use_cache=False,
    )
    logps, mask = token_logps(out.logits, batch["input_ids"], batch["answer_mask"])
    return sequence_logps(logps, mask, average), logps, mask
