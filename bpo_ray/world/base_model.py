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
4. **Vision pretraining** (CLIP's role) on 2x2 patches that straddle the 3x3 scene grid, so
   objects off the corners are seen weakly, and **feature alignment**: the projector maps each
   patch onto the LM's word embeddings of what it shows.
5. **Short VQA**: existence questions alone, which form the "compare the asked word with the
   image tokens" circuit (mixed into the captions from the start, they stay at chance).
6. **Alignment** (LLaVA's instruction stage): answer-token loss on the train split's records
   plus existence questions. Short, and with weak evidence off the corners: the model describes
   what it sees and fills in the rest from its prior (the hallucination BPO corrects).

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
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image

from bpo_ray import numerics
from bpo_ray.progress import progress as report_progress
from bpo_ray.config.shared import NumericsConfig
from bpo_ray.config.world import BaseModelConfig
from bpo_ray.models.checkpoint import save_portable, weights_sha256  # noqa: F401  (re-exported)
from bpo_ray.models.loading import load_mllm, load_text_lm
from bpo_ray.models.prompts import IMAGE_TOKEN, build_prompt, strip_image_token
from bpo_ray.models.tiny import TinySpec, build_tiny_models
from bpo_ray.world import vocab
from bpo_ray.world.corpus import chat_prior_documents, error_injection_documents, existence_probe, reading_documents

BASE_MODEL_FORMAT = "bpo-ray/bias-world-base-model/2"
IGNORE_INDEX = -100


BaseModelRecipe = BaseModelConfig
"""The recipe's knobs are the config section ``world.base_model`` (``bpo_ray.config.world``)."""


def patch_size_for(recipe: BaseModelRecipe, image_size: int) -> int:
    """The vision patch size in pixels; 0 means a third of the image, one patch per grid cell."""
    patch = recipe.patch_size or image_size // 3
    if patch <= 0 or image_size % patch:
        raise ValueError(f"world.image_size {image_size} is not a multiple of world.base_model.patch_size {patch} "
                         "(the defaults are 48 and 24)")
    return patch


def tiny_spec(recipe: BaseModelRecipe, image_size: int) -> TinySpec:
    return TinySpec(
        image_size=image_size,
        patch_size=patch_size_for(recipe, image_size),
        vision_hidden=recipe.vision_hidden,
        vision_layers=recipe.vision_layers,
        vision_heads=recipe.vision_heads,
        lm_hidden=recipe.lm_hidden,
        lm_layers=recipe.lm_layers,
        lm_heads=recipe.lm_heads,
        lm_intermediate=recipe.lm_intermediate,
        vocab_size=recipe.vocab_size,
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


def read_corpus(world_dir: str | Path) -> list[str]:
    """The world's prior corpus, one caption a line."""
    path = Path(world_dir) / read_world(world_dir)["files"]["corpus"]
    return path.read_text(encoding="utf-8").splitlines()


def alignment_records(records: Sequence[dict[str, Any]], share: float) -> list[dict[str, Any]]:
    """Records of the first ``share`` of the train split's scenes (all their record kinds)."""
    images = list(dict.fromkeys(record["image"] for record in records))
    keep = set(images[: max(1, round(share * len(images)))])
    return [record for record in records if record["image"] in keep]


def existence_records(scenes: Sequence[dict[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` extra POPE-style existence questions over ``scenes`` (LLaVA records): half about a
    present kind, half about an absent one, and half of those the absent prior partner of a
    present kind. LLaVA-1.5's mixture has such short VQA (e.g. VQAv2, GQA); here they teach the
    model to check the image for the object asked about, including when the prior says "yes"."""
    rng = random.Random(f"base-model-existence:{seed}")
    records = []
    for _ in range(n):
        scene = rng.choice(scenes)
        question, answer = existence_probe(sorted({o["kind"] for o in scene["objects"]}), rng)
        records.append({"image": scene["image"], "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
            {"from": "gpt", "value": answer},
        ]})
    return records


def conversation_turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA record, ``<image>`` removed from the questions."""
    turns = record["conversations"]
    return [(strip_image_token(q["value"]), a["value"]) for q, a in zip(turns[::2], turns[1::2])]


# ---------------------------------------------------------------------------------------------
# Tokenised training data


def pretraining_documents(world_dir: str | Path, recipe: BaseModelRecipe, seed: int = 0) -> list[str]:
    """The text LM's corpus: prior captions (a ``chat_share`` of them in chat form) plus
    Table-1 error-injection documents, in a seeded shuffled order."""
    captions = read_corpus(world_dir)
    n_chat = round(recipe.chat_share * len(captions))
    documents = chat_prior_documents(captions[:n_chat], seed) + captions[n_chat:]
    documents += error_injection_documents(recipe.injection_documents, seed)
    documents += reading_documents(recipe.reading_documents, seed)
    random.Random(f"base-model-documents:{seed}").shuffle(documents)
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


def run_steps(optimizer, steps: int, warmup: int, desc: str, batch_loss, clip: Sequence[torch.nn.Parameter] = ()) -> list[float]:
    """The recipe's training loop: ``steps`` AdamW steps on ``batch_loss()`` (which draws its own
    batch), each param group's lr on ``learning_rate`` from its ``"peak"``, gradient norm clipped
    to 1 over ``clip`` when given; returns the losses."""
    losses: list[float] = []
    progress = report_progress(range(steps), desc=desc, unit="step", leave=False)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, group["peak"], warmup)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def pretrain_text_lm(model, stream: torch.Tensor, recipe: BaseModelRecipe, seed: int = 0) -> list[float]:
    """Causal-LM training on random ``max_length`` windows of the packed stream; returns losses."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": params, "peak": recipe.pretrain_lr}], lr=recipe.pretrain_lr,
                                  betas=(0.9, 0.95), weight_decay=0.1)
    window = min(recipe.max_length, len(stream) - 1)

    def batch_loss() -> torch.Tensor:
        starts = torch.randint(0, len(stream) - window, (recipe.pretrain_batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
        return model(input_ids=batch, labels=batch).loss

    model.train()
    losses = run_steps(optimizer, recipe.pretrain_steps, recipe.warmup_steps, "pretrain text LM", batch_loss, clip=params)
    model.eval()
    return losses


@torch.no_grad()
def transplant_language_model(text_lm, mllm) -> None:
    """Copy the text LM (decoder + LM head) into the LLaVA, as LLaVA starts from Vicuna."""
    mllm.model.language_model.load_state_dict(text_lm.model.state_dict())
    mllm.lm_head.load_state_dict(text_lm.lm_head.state_dict())


def image_tensors(processor, world_dir: str | Path, images: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pixel values of every image, decoded once (the training loops index into them)."""
    pixels = {}
    for start in range(0, len(images), 256):
        chunk = images[start : start + 256]
        loaded = [Image.open(Path(world_dir) / name).convert("RGB") for name in chunk]
        values = processor.image_processor(images=loaded, return_tensors="pt")["pixel_values"]
        pixels.update(zip(chunk, values))
    return pixels


def patch_objects(scene: dict[str, Any], grid: int) -> list[tuple[int, dict[str, Any] | None]]:
    """For each image patch (row-major): the scene grid cell holding the patch centre and the
    object in that cell (None when it is empty)."""
    by_cell = {vocab.POSITIONS.index(o["position"]): o for o in scene["objects"]}
    cells = []
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        cell = int((row + 0.5) * 3 / grid) * 3 + int((col + 0.5) * 3 / grid)
        cells.append((cell, by_cell.get(cell)))
    return cells


def patch_targets(scene: dict[str, Any], grid: int) -> tuple[list[int], list[int]]:
    """Kind and colour class of each image patch (row-major); the last class of each means "empty"."""
    kinds, colours = [], []
    for _, obj in patch_objects(scene, grid):
        kinds.append(vocab.OBJECT_KINDS.index(obj["kind"]) if obj else len(vocab.OBJECT_KINDS))
        colours.append(list(vocab.COLOURS).index(obj["colour"]) if obj else len(vocab.COLOURS))
    return kinds, colours


def vision_patch_features(mllm, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision-tower layer LLaVA feeds its projector, CLS dropped: ``(n, patches, vision_hidden)``."""
    hidden = mllm.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[mllm.config.vision_feature_layer][:, 1:]


def pretrain_vision(mllm, pixels: dict[str, torch.Tensor], scenes: Sequence[dict[str, Any]], recipe: BaseModelRecipe, seed: int = 0) -> list[float]:
    """Train the vision tower to tell each patch's kind and colour (cross-entropy through a
    throw-away linear head). Stands in for CLIP's pretraining, which LLaVA inherits: afterwards
    the patch features name what is where, so the short alignment only has to read them."""
    grid = mllm.config.vision_config.image_size // mllm.config.vision_config.patch_size
    targets = [patch_targets(scene, grid) for scene in scenes]
    kinds = torch.tensor([t[0] for t in targets])
    colours = torch.tensor([t[1] for t in targets])
    n_kinds, n_colours = len(vocab.OBJECT_KINDS) + 1, len(vocab.COLOURS) + 1
    head = torch.nn.Linear(mllm.config.vision_config.hidden_size, n_kinds + n_colours)
    params = [*mllm.model.vision_tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW([{"params": params, "peak": recipe.vision_lr}], lr=recipe.vision_lr,
                                  betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 2)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(0, len(scenes), (recipe.vision_batch_size,), generator=generator)
        logits = head(vision_patch_features(mllm, torch.stack([pixels[scenes[r]["image"]] for r in rows.tolist()])))
        return torch.nn.functional.cross_entropy(logits[..., :n_kinds].flatten(0, 1), kinds[rows].flatten()) \
            + torch.nn.functional.cross_entropy(logits[..., n_kinds:].flatten(0, 1), colours[rows].flatten())

    mllm.model.vision_tower.train()
    losses = run_steps(optimizer, recipe.vision_steps, recipe.warmup_steps, "pretrain vision", batch_loss, clip=params)
    mllm.model.vision_tower.eval()
    return losses


def patch_words(scene: dict[str, Any], grid: int) -> list[list[str]]:
    """The words that describe each patch (row-major): colour, kind and the position's words
    ("red", "cup", "top", "left"); an empty patch has none."""
    return [[obj["colour"], obj["kind"], *vocab.POSITIONS[cell].split()] if obj else []
            for cell, obj in patch_objects(scene, grid)]


@torch.no_grad()
def word_embedding_targets(mllm, tokenizer, words: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per patch: the sum of the LM's input embeddings of its words (each as the one token
    `` word``), scaled to unit RMS per dimension; zeros for an empty patch. ``(patches, hidden)``."""
    embeddings = mllm.get_input_embeddings().weight
    hidden = embeddings.shape[1]
    out = torch.zeros(len(words), hidden)
    for index, patch in enumerate(words):
        if not patch:
            continue
        ids = [tokenizer(f" {word}", add_special_tokens=False)["input_ids"] for word in patch]
        vector = sum(embeddings[i].sum(0) for i in ids)
        out[index] = vector / vector.pow(2).mean().sqrt()
    return out


def align_projector_to_words(mllm, tokenizer, pixels: dict[str, torch.Tensor], scenes: Sequence[dict[str, Any]], recipe: BaseModelRecipe, seed: int = 0) -> list[float]:
    """LLaVA's stage 1 ("feature alignment"), made direct: the projector learns to map each
    patch feature onto the LM's word embeddings of what the patch shows (colour, kind, where),
    i.e. it becomes a visual tokenizer for the language model. Vision tower and LM stay frozen;
    targets have unit RMS, the scale ``bpo_ray.noise`` assumes for the features it weakens."""
    grid = mllm.config.vision_config.image_size // mllm.config.vision_config.patch_size
    with torch.no_grad():
        patch_features = torch.cat([
            vision_patch_features(mllm, torch.stack([pixels[s["image"]] for s in scenes[i : i + 256]]))
            for i in range(0, len(scenes), 256)
        ])
    targets = torch.stack([
        word_embedding_targets(mllm, tokenizer, patch_words(scene, grid)) for scene in scenes
    ])
    projector = mllm.model.multi_modal_projector
    optimizer = torch.optim.AdamW([{"params": list(projector.parameters()), "peak": recipe.projector_lr}],
                                  lr=recipe.projector_lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 3)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(0, len(scenes), (recipe.vision_batch_size,), generator=generator)
        return torch.nn.functional.mse_loss(projector(patch_features[rows]), targets[rows])

    projector.train()
    losses = run_steps(optimizer, recipe.projector_steps, recipe.warmup_steps, "align projector", batch_loss)
    projector.eval()
    return losses


def encode_text_chat(tokenizer, document: str) -> tuple[list[int], list[int]]:
    """A text-only chat document ``USER: .. ASSISTANT: answer`` as ids and answer-only labels."""
    prompt, answer = document.split(" ASSISTANT: ", 1)
    prompt_ids = tokenizer(f"{prompt} ASSISTANT:", add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def align_mllm(mllm, tokenizer, pixels: dict[str, torch.Tensor], records: Sequence[dict[str, Any]], recipe: BaseModelRecipe,
               seed: int = 0, text_documents: Sequence[str] = ()) -> list[float]:
    """LLaVA's alignment stage: answer-token loss on image conversations; returns losses.

    The vision tower stays frozen (as LLaVA keeps CLIP frozen); the projector trains at
    ``align_lr`` and the language model at ``align_lm_lr`` (0 freezes it too). With
    ``text_documents`` (text-only prior chat, as LLaVA-1.5 mixes ShareGPT text into its data), an
    ``align_text_share`` of every batch is text-only; the loss weighs both parts by their rows.
    """
    image_seq_length = mllm.config.image_seq_length
    examples = [encode_conversation(tokenizer, conversation_turns(r), image_seq_length) for r in records]
    text_examples = [encode_text_chat(tokenizer, d) for d in text_documents]
    n_text = round(recipe.align_batch_size * recipe.align_text_share) if text_examples else 0
    n_image = max(1, recipe.align_batch_size - n_text)
    projector = list(mllm.model.multi_modal_projector.parameters())
    language_model = [*mllm.model.language_model.parameters(), *mllm.lm_head.parameters()]
    groups = [{"params": projector, "lr": recipe.align_lr, "peak": recipe.align_lr}]
    if recipe.align_lm_lr > 0:
        groups.append({"params": language_model, "lr": recipe.align_lm_lr, "peak": recipe.align_lm_lr})
    frozen = [*mllm.model.vision_tower.parameters(), *(language_model if recipe.align_lm_lr <= 0 else [])]
    for param in frozen:
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(0, len(examples), (n_image,), generator=generator).tolist()
        batch = pad_batch([examples[row] for row in rows], tokenizer.pad_token_id)
        pixel_values = torch.stack([pixels[records[row]["image"]] for row in rows])
        loss = mllm(**batch, pixel_values=pixel_values).loss
        if n_text:
            text_rows = torch.randint(0, len(text_examples), (n_text,), generator=generator).tolist()
            text_loss = mllm(**pad_batch([text_examples[row] for row in text_rows], tokenizer.pad_token_id)).loss
            loss = (n_image * loss + n_text * text_loss) / (n_image + n_text)
        return loss

    mllm.train()
    losses = run_steps(optimizer, recipe.align_steps, recipe.warmup_steps, "align LLaVA", batch_loss,
                       clip=[p for g in groups for p in g["params"]])
    for param in frozen:
        param.requires_grad_(True)
    mllm.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# The recipe


def _cache_key(world: dict[str, Any], recipe: BaseModelRecipe, seed: int, numerics_cfg: NumericsConfig) -> dict[str, Any]:
    return {"format": BASE_MODEL_FORMAT, "world": world["params"], "seed": seed, "recipe": recipe.model_dump(),
            "numerics": numerics_cfg.model_dump()}


def build_base_model(
    world_dir: str | Path, out_dir: str | Path, recipe: BaseModelRecipe = BaseModelRecipe(), seed: int | None = None,
    numerics_cfg: NumericsConfig = NumericsConfig(),
) -> dict[str, Any]:
    """Build (or find already built) the base models; returns ``base_model.json``'s content
    with ``paths`` {"mllm", "text_llm"} (absolute)."""
    out_dir = Path(out_dir)
    world = read_world(world_dir)
    seed = world["params"]["seed"] if seed is None else seed
    key = _cache_key(world, recipe, seed, numerics_cfg)
    meta_path = out_dir / "base_model.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and all(Path(p, "config.json").exists() for p in meta["paths"].values()):
            return meta
        meta_path.unlink()

    started = time.perf_counter()
    # The recipe is one process: pinned kernels and a fixed thread count make its bits the same on
    # every CPU of the machine kind, from the CLI or a Ray job driver (which inherits OMP_NUM_THREADS=1).
    numerics.check(numerics_cfg.cpu_isa, numerics_cfg.threads or max(1, len(os.sched_getaffinity(0))),
                   where="the base-model recipe")
    torch.manual_seed(seed)
    documents = pretraining_documents(world_dir, recipe, seed)
    spec = tiny_spec(recipe, world["params"]["image_size"])
    paths = build_tiny_models(out_dir, seed=seed, spec=spec, corpus=tokenizer_texts(world_dir, documents))
    timings = {"init": time.perf_counter() - started}

    text_lm, tokenizer = load_text_lm(paths["text_llm"], device="cpu")
    torch.manual_seed(seed)
    pretrain_losses = pretrain_text_lm(text_lm, token_stream(tokenizer, documents), recipe, seed)
    save_portable(text_lm, tokenizer, paths["text_llm"])
    timings["pretrain"] = time.perf_counter() - started - sum(timings.values())

    mllm, processor = load_mllm(paths["mllm"], device="cpu")
    transplant_language_model(text_lm, mllm)
    scenes = [s for s in read_jsonl(Path(world_dir) / world["files"]["scenes"]) if s["split"] == "train"]
    torch.manual_seed(seed + 2)
    # Every train image decoded once; vision, projector and alignment steps index into them.
    pixels = image_tensors(processor, world_dir, [scene["image"] for scene in scenes])
    vision_losses = pretrain_vision(mllm, pixels, scenes, recipe, seed)
    timings["vision"] = time.perf_counter() - started - sum(timings.values())

    torch.manual_seed(seed + 3)
    projector_losses = align_projector_to_words(mllm, processor.tokenizer, pixels, scenes, recipe, seed)
    timings["projector"] = time.perf_counter() - started - sum(timings.values())

    if recipe.existence_steps:
        # Short VQA first (LLaVA-1.5 mixes VQAv2/GQA in): existence questions alone form the
        # "compare the asked word with the image tokens" circuit in a few hundred steps; mixed
        # into the captions from the start, the same questions stay at chance for thousands.
        torch.manual_seed(seed + 4)
        existence_recipe = recipe.model_copy(update={"align_steps": recipe.existence_steps, "align_text_share": 0.0})
        existence_losses = align_mllm(mllm, processor.tokenizer, pixels, existence_records(scenes, recipe.existence_questions, seed + 4),
                                      existence_recipe, seed + 4)
    else:
        existence_losses = []
    timings["existence"] = time.perf_counter() - started - sum(timings.values())

    records = alignment_records(read_jsonl(Path(world_dir) / world["files"]["train"]), recipe.align_share)
    if recipe.existence_share > 0:
        aligned = {record["image"] for record in records}
        n_extra = round(len(records) * recipe.existence_share / (1 - recipe.existence_share))
        records += existence_records([s for s in scenes if s["image"] in aligned], n_extra, seed)
    torch.manual_seed(seed + 1)
    text_documents = chat_prior_documents(read_corpus(world_dir), seed + 1) if recipe.align_text_share > 0 else []
    align_losses = align_mllm(mllm, processor.tokenizer, pixels, records, recipe, seed, text_documents)
    save_portable(mllm, processor, paths["mllm"])
    timings["align"] = time.perf_counter() - started - sum(timings.values())

    meta = {
        "key": key,
        "paths": {name: str(Path(path).resolve()) for name, path in paths.items()},
        "vocab_size": len(tokenizer),
        "pretrain": {"documents": len(documents), "first_loss": pretrain_losses[0], "last_loss": _tail_mean(pretrain_losses)},
        "vision": {"scenes": len(scenes), "first_loss": vision_losses[0], "last_loss": _tail_mean(vision_losses)},
        "projector": {"first_loss": projector_losses[0], "last_loss": _tail_mean(projector_losses)},
        "existence": {"first_loss": existence_losses[0], "last_loss": _tail_mean(existence_losses)} if existence_losses else None,
        "align": {"records": len(records), "first_loss": align_losses[0], "last_loss": _tail_mean(align_losses)},
        "seconds": {name: round(value, 2) for name, value in timings.items()},
        "weights_sha256": {name: weights_sha256(path) for name, path in paths.items()},
        "numerics": numerics.describe(numerics_cfg.cpu_isa, torch.get_num_threads()),
    }
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta_path)
    return meta


def _tail_mean(values: Sequence[float], n: int = 10) -> float:
    tail = list(values)[-n:]
    return sum(tail) / len(tail) if tail else float("nan")
