"""The bias world's base model: a tiny LLaVA that sees the scenes yet hallucinates from its prior.

The recipe mirrors how LLaVA-1.5 is made, at toy size:

1. **Tokenizer and random-init models** (``bpo_ray.models.tiny.build_tiny_models``), the tokenizer
   trained on the world's text so every world word is one token.
2. **Language pretraining** (Vicuna's role): the text LM learns the prior corpus (a cup comes with
   a saucer nine times in ten), the same captions in chat form, and Table-1 error-injection
   documents, so it is also the error injector's LLM (BPO paper, Table 1). nanoGPT-style: packed
   token stream, random windows, AdamW, cosine schedule.
3. **Transplant**: the text LM's weights become the LLaVA's language model, as LLaVA starts from
   Vicuna.
4. **Alignment** (LLaVA's short alignment stage): a few hundred steps on a small share of the
   train split, loss on answer tokens only, prompts from ``bpo_ray.models.prompts.build_prompt``.
   The vision tower is trained too (ours has no CLIP pretraining to inherit). Short on purpose:
   the model learns to see, but not long enough to unlearn the prior, so it names prior partners
   that are not in the image (the hallucination BPO corrects).

``build_base_model(world_dir, out_dir, recipe)`` writes ``out_dir/llava`` (the MLLM) and
``out_dir/text_lm`` (the error injector's LLM) with ``save_portable`` (HF + vLLM loadable) and
``out_dir/base_model.json`` last; a second call with equal parameters returns at once.
Same parameters, same machine -> bit-identical weights (seeded init, seeded batches, no dropout).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from bpo_ray.models.checkpoint import save_portable
from bpo_ray.models.loading import load_mllm, load_text_lm
from bpo_ray.models.prompts import IMAGE_TOKEN, build_prompt, strip_image_token
from bpo_ray.models.tiny import TinySpec, build_tiny_models
from bpo_ray.world.corpus import chat_prior_documents, error_injection_documents

BASE_MODEL_FORMAT = "bpo-ray/bias-world-base-model/1"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class BaseModelRecipe:
    """Every knob of the recipe; all of them key the cache."""

    seed: int = 0
    # model sizes (TinySpec); vLLM's CPU attention needs lm_hidden / lm_heads >= 32
    lm_hidden: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 8
    vocab_size: int = 2048
    # language pretraining (the prior)
    pretrain_steps: int = 300
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    max_length: int = 256
    chat_share: float = 0.5
    injection_documents: int = 3000
    # alignment (the short LLaVA stage)
    align_share: float = 0.25
    align_steps: int = 300
    align_batch_size: int = 32
    align_lr: float = 2e-3
    align_lm_lr: float = 5e-4
    warmup_steps: int = 20

    def spec(self, image_size: int) -> TinySpec:
        return TinySpec(
            image_size=image_size,
            patch_size=self.patch_size,
            vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers,
            vision_heads=self.vision_heads,
            lm_hidden=self.lm_hidden,
            lm_layers=self.lm_layers,
            lm_heads=self.lm_heads,
            lm_intermediate=self.lm_intermediate,
            vocab_size=self.vocab_size,
        )


# ---------------------------------------------------------------------------------------------
# World files


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_world(world_dir: str | Path) -> dict[str, Any]:
    path = Path(world_dir) / "world.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: build the world first (bpo_ray.world.build.build_world)")
    return json.loads(path.read_text())


def alignment_records(records: Sequence[dict[str, Any]], share: float) -> list[dict[str, Any]]:
    """Records of the first ``share`` of the train split's scenes (all their record kinds)."""
    images = list(dict.fromkeys(record["image"] for record in records))
    keep = set(images[: max(1, round(share * len(images)))])
    return [record for record in records if record["image"] in keep]


def conversation_turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA record, ``<image>`` removed from the questions."""
    turns = record["conversations"]
    return [(strip_image_token(q["value"]), a["value"]) for q, a in zip(turns[::2], turns[1::2])]


# ---------------------------------------------------------------------------------------------
# Tokenised training data


def pretraining_documents(world_dir: str | Path, recipe: BaseModelRecipe) -> list[str]:
    """The text LM's corpus: prior captions (a ``chat_share`` of them in chat form) plus
    Table-1 error-injection documents, in a seeded shuffled order."""
    world = read_world(world_dir)
    captions = (Path(world_dir) / world["files"]["corpus"]).read_text(encoding="utf-8").splitlines()
    n_chat = round(recipe.chat_share * len(captions))
    documents = chat_prior_documents(captions[:n_chat], recipe.seed) + captions[n_chat:]
    documents += error_injection_documents(recipe.injection_documents, recipe.seed)
    random.Random(f"base-model-documents:{recipe.seed}").shuffle(documents)
    return documents


def tokenizer_texts(world_dir: str | Path, documents: Sequence[str]) -> list[str]:
    """What the shared tokenizer learns from: the LM documents and every train conversation."""
    world = read_world(world_dir)
    records = read_jsonl(Path(world_dir) / world["files"]["train"])
    turns = [turn["value"] for record in records for turn in record["conversations"]]
    return list(documents) + turns


def token_stream(tokenizer, documents: Iterable[str]) -> torch.Tensor:
    """``<s> doc </s> <s> doc </s> ...`` as one 1-D tensor (nanoGPT's packed training data)."""
    ids: list[int] = []
    for encoded in tokenizer(list(documents), add_special_tokens=True)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def encode_conversation(tokenizer, turns: Sequence[tuple[str, str]], image_seq_length: int) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation in the LLaVA-1.5 format and labels that keep only the
    answer tokens (each answer + ``</s>``); the ``<image>`` token is already expanded.

    Pieces are tokenised separately; the byte-level pre-tokenizer splits at the same spaces, so
    the prompt part equals what ``processor(text=build_prompt(...))`` gives at inference.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for index, (question, answer) in enumerate(turns):
        prompt = build_prompt(question) if index == 0 else f"USER: {question} ASSISTANT:"
        prompt = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length)
        prompt_ids = tokenizer(prompt, add_special_tokens=index == 0)["input_ids"]
        answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return input_ids, labels


def pad_batch(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels``, ``attention_mask`` (positions start at 0 like at
    inference, where left padding is undone by position ids from the attention mask)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# Training loops


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak (nanoGPT's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def pretrain_text_lm(model, stream: torch.Tensor, recipe: BaseModelRecipe) -> list[float]:
    """Causal-LM training on random ``max_length`` windows of the packed stream; returns losses."""
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    window = min(recipe.max_length, len(stream) - 1)
    losses: list[float] = []
    model.train()
    progress = tqdm(range(recipe.pretrain_steps), desc="pretrain text LM", leave=False)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.pretrain_steps, recipe.pretrain_lr, recipe.warmup_steps)
        starts = torch.randint(0, len(stream) - window, (recipe.pretrain_batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def transplant_language_model(text_lm, mllm) -> None:
    """Copy the text LM (decoder + LM head) into the LLaVA, as LLaVA starts from Vicuna."""
    mllm.model.language_model.load_state_dict(text_lm.model.state_dict())
    mllm.lm_head.load_state_dict(text_lm.lm_head.state_dict())


def image_tensors(processor, world_dir: str | Path, images: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pixel values of every image once (the alignment loop indexes into them)."""
    pixels = {}
    for start in range(0, len(images), 256):
        chunk = images[start : start + 256]
        loaded = [Image.open(Path(world_dir) / name).convert("RGB") for name in chunk]
        values = processor.image_processor(images=loaded, return_tensors="pt")["pixel_values"]
        pixels.update(zip(chunk, values))
    return pixels


def align_mllm(mllm, processor, world_dir: str | Path, records: Sequence[dict[str, Any]], recipe: BaseModelRecipe) -> list[float]:
    """LLaVA's alignment stage: answer-token loss on image conversations; returns losses.

    The projector and the vision tower train at ``align_lr``, the language model at
    ``align_lm_lr`` (0 freezes it).
    """
    tokenizer = processor.tokenizer
    image_seq_length = mllm.config.image_seq_length
    examples = [encode_conversation(tokenizer, conversation_turns(r), image_seq_length) for r in records]
    pixels = image_tensors(processor, world_dir, [r["image"] for r in records])
    groups = [
        {"params": [*mllm.model.vision_tower.parameters(), *mllm.model.multi_modal_projector.parameters()],
         "lr": recipe.align_lr, "peak": recipe.align_lr},
    ]
    lm_params = [*mllm.model.language_model.parameters(), *mllm.lm_head.parameters()]
    if recipe.align_lm_lr > 0:
        groups.append({"params": lm_params, "lr": recipe.align_lm_lr, "peak": recipe.align_lm_lr})
    else:
        for param in lm_params:
            param.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    losses: list[float] = []
    mllm.train()
    progress = tqdm(range(recipe.align_steps), desc="align LLaVA", leave=False)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.align_steps, group["peak"], recipe.warmup_steps)
        rows = torch.randint(0, len(examples), (recipe.align_batch_size,), generator=generator).tolist()
        batch = pad_batch([examples[row] for row in rows], tokenizer.pad_token_id)
        pixel_values = torch.stack([pixels[records[row]["image"]] for row in rows])
        loss = mllm(**batch, pixel_values=pixel_values).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    for param in lm_params:
        param.requires_grad_(True)
    mllm.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# The recipe


def _cache_key(world: dict[str, Any], recipe: BaseModelRecipe) -> dict[str, Any]:
    return {"format": BASE_MODEL_FORMAT, "world": world["params"], "recipe": asdict(recipe)}


def build_base_model(world_dir: str | Path, out_dir: str | Path, recipe: BaseModelRecipe = BaseModelRecipe()) -> dict[str, Any]:
    """Build (or find already built) the base models; returns ``base_model.json``'s content
    with ``paths`` {"mllm", "text_llm"} (absolute)."""
    out_dir = Path(out_dir)
    world = read_world(world_dir)
    key = _cache_key(world, recipe)
    meta_path = out_dir / "base_model.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and all(Path(p, "config.json").exists() for p in meta["paths"].values()):
            return meta
        meta_path.unlink()

    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    documents = pretraining_documents(world_dir, recipe)
    spec = recipe.spec(world["params"]["image_size"])
    paths = build_tiny_models(out_dir, seed=recipe.seed, spec=spec, corpus=tokenizer_texts(world_dir, documents))
    timings = {"init": time.perf_counter() - started}

    text_lm, tokenizer = load_text_lm(paths["text_llm"], device="cpu")
    torch.manual_seed(recipe.seed)
    pretrain_losses = pretrain_text_lm(text_lm, token_stream(tokenizer, documents), recipe)
    save_portable(text_lm, tokenizer, paths["text_llm"])
    timings["pretrain"] = time.perf_counter() - started - sum(timings.values())

    mllm, processor = load_mllm(paths["mllm"], device="cpu")
    transplant_language_model(text_lm, mllm)
    records = alignment_records(read_jsonl(Path(world_dir) / world["files"]["train"]), recipe.align_share)
    torch.manual_seed(recipe.seed + 1)
    align_losses = align_mllm(mllm, processor, world_dir, records, recipe)
    save_portable(mllm, processor, paths["mllm"])
    timings["align"] = time.perf_counter() - started - sum(timings.values())

    meta = {
        "key": key,
        "paths": {name: str(Path(path).resolve()) for name, path in paths.items()},
        "vocab_size": len(tokenizer),
        "pretrain": {"documents": len(documents), "first_loss": pretrain_losses[0], "last_loss": _tail_mean(pretrain_losses)},
        "align": {"records": len(records), "first_loss": align_losses[0], "last_loss": _tail_mean(align_losses)},
        "seconds": {name: round(value, 2) for name, value in timings.items()},
    }
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta_path)
    return meta


def _tail_mean(values: Sequence[float], n: int = 10) -> float:
    tail = list(values)[-n:]
    return sum(tail) / len(tail) if tail else float("nan")
