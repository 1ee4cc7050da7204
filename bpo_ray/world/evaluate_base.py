"""Measure the bias world's base model: CHAIR on detailed captions, POPE probes, and the noise curve.

The noise curve is the analogue of the BPO paper's Figure 5: diffusion noise
(``bpo_ray.noise.add_diffusion_noise``, the module the generate stage uses) is added to the
post-projector image features at growing steps, and CHAIR_i and the prior-typical hallucination
rate rise as the language prior takes over from the weakened image.

All generation is greedy and batched through ``bpo_ray.models.mllm`` (transformers), noise is
seeded per image, so every number here is reproducible.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from bpo_ray.metrics.chair import ChairItem, prior_typical_share, score_chair
from bpo_ray.metrics.pope import build_pope_probes, score_pope
from bpo_ray.models.mllm import Sampling, decode_answers, encode_prompts, generate_from_features, image_features
from bpo_ray.models.prompts import build_prompt, strip_image_token
from bpo_ray.noise import add_diffusion_noise
from bpo_ray.progress import progress as report_progress
from bpo_ray.world import vocab

DEFAULT_NOISE_STEPS: tuple[int, ...] = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)


def read_split(world_dir: str | Path, split: str) -> list[dict[str, Any]]:
    with open(Path(world_dir) / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def caption_items(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"image", "question", "objects"}`` for each detailed-caption record."""
    return [
        {"image": r["image"], "question": strip_image_token(r["conversations"][0]["value"]), "objects": r["objects"]}
        for r in records
        if r.get("source") == "caption"
    ]


def image_noise_seed(image: str, seed: int) -> int:
    """Per-image noise seed: batching never changes which noise an image gets."""
    return (zlib.crc32(image.encode("utf-8")) + 1_000_003 * seed) % (2**31)


def answer_questions(
    model,
    processor,
    world_dir: str | Path,
    images: Sequence[str],
    questions: Sequence[str],
    noise_step: Optional[int] = None,
    noise_seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 96,
    desc: str = "answer",
) -> list[str]:
    """Greedy answers to ``questions[i]`` about ``images[i]`` (paths relative to ``world_dir``);
    with ``noise_step``, the image features are weakened by the diffusion forward process."""
    answers: list[str] = []
    loaded: dict[str, Image.Image] = {}
    for start in report_progress(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        names = images[start : start + batch_size]
        for name in names:
            if name not in loaded:
                loaded[name] = Image.open(Path(world_dir) / name).convert("RGB")
        prompts = [build_prompt(q) for q in questions[start : start + batch_size]]
        inputs = encode_prompts(processor, [loaded[n] for n in names], prompts)
        features = image_features(model, inputs["pixel_values"])
        if noise_step is not None and noise_step > 0:
            features = torch.cat([
                add_diffusion_noise(features[i : i + 1], noise_step, image_noise_seed(name, noise_seed))
                for i, name in enumerate(names)
            ])
        tok = processor.tokenizer
        out = generate_from_features(model, inputs["input_ids"], inputs["attention_mask"], features,
                                     Sampling(max_new_tokens=max_new_tokens), tok.pad_token_id, tok.eos_token_id)
        answers += decode_answers(tok, out)
    return answers


def prior_typical_rate(items: Sequence[ChairItem]) -> float:
    """Prior-typical hallucinated mentions (a partner of a present object) over all mentions:
    the part of CHAIR_i the language prior explains."""
    partners = vocab.prior_partners()
    mentions = sum(len(item.mentioned) for item in items)
    typical = sum(
        name in {partners[present] for present in item.ground_truth}
        for item in items
        for name in item.hallucinated
    )
    return typical / mentions if mentions else 0.0


def caption_metrics(captions: Sequence[str], objects: Sequence[Sequence[str]]) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i, recall, and how much of the hallucination is prior-typical."""
    report = score_chair(captions, objects, vocab.SYNONYMS)
    return {
        **report.summary(),
        "prior_typical_share": prior_typical_share(report.items, vocab.prior_partners()),
        "prior_typical_rate": prior_typical_rate(report.items),
    }


def evaluate_captions(model, processor, world_dir, records, noise_step=None, noise_seed=0, batch_size=64,
                      max_new_tokens=96, n_examples=3) -> dict[str, Any]:
    items = caption_items(records)
    captions = answer_questions(
        model, processor, world_dir, [i["image"] for i in items], [i["question"] for i in items],
        noise_step, noise_seed, batch_size, max_new_tokens, desc=f"captions (noise {noise_step or 0})",
    )
    metrics = caption_metrics(captions, [i["objects"] for i in items])
    metrics["noise_step"] = noise_step or 0
    metrics["examples"] = [
        {"image": i["image"], "objects": i["objects"], "caption": c} for i, c in zip(items[:n_examples], captions)
    ]
    return metrics


def pope_probes_for(records: Sequence[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """POPE probes over the split's images; adversarial negatives are the absent prior partners."""
    annotations = {r["image"]: r["objects"] for r in records}
    ranking = {kind: [partner] for kind, partner in vocab.prior_partners().items()}
    return build_pope_probes(annotations, vocab.OBJECT_KINDS, n_per_image=3, seed=seed, adversarial_ranking=ranking)


def evaluate_pope(model, processor, world_dir, records, seed=0, batch_size=64) -> dict[str, dict[str, float]]:
    """Accuracy, precision, recall, F1 and yes-ratio per POPE split (each distinct probe asked once)."""
    probes = pope_probes_for(records, seed)
    unique = list(dict.fromkeys((p["image"], p["question"]) for p in probes))
    answers = answer_questions(model, processor, world_dir, [u[0] for u in unique], [u[1] for u in unique],
                               batch_size=batch_size, max_new_tokens=4, desc="POPE")
    answer_of = dict(zip(unique, answers))
    scores = score_pope(probes, [answer_of[(p["image"], p["question"])] for p in probes])
    return {split: asdict(score) for split, score in scores.items()}


def noise_curve(model, processor, world_dir, records, steps: Sequence[int] = DEFAULT_NOISE_STEPS, noise_seed=0,
                batch_size=64, max_new_tokens=96) -> list[dict[str, Any]]:
    """Caption metrics at each noise step (Figure 5's analogue)."""
    return [
        evaluate_captions(model, processor, world_dir, records, step, noise_seed, batch_size, max_new_tokens, 0)
        for step in steps
    ]


def plot_noise_curve(curve: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG of CHAIR_s, CHAIR_i and the prior-typical rate against the noise step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [point["noise_step"] for point in curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (("chair_i", "CHAIR_i (hallucinated / all mentions)"),
                       ("prior_typical_rate", "prior-typical hallucinations / all mentions"),
                       ("chair_s", "CHAIR_s (captions with a hallucination)")):
        ax.plot(steps, [point[key] for point in curve], marker="o", label=label)
    ax.set_xlabel("diffusion noise step t on the image features (T = 1000)")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1)
    ax.set_title("Bias world: weakening the image lets the language prior take over")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate_base_model(
    world_dir: str | Path,
    mllm_path: str | Path,
    out_dir: str | Path,
    split: str = "test",
    noise_steps: Sequence[int] = DEFAULT_NOISE_STEPS,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 96,
    key: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Every measurement of the base model on ``split``; writes ``base_eval.json`` and
    ``noise_curve.{json,png}`` to ``out_dir`` and returns the evaluation."""
    from bpo_ray.models.loading import load_mllm

    model, processor = load_mllm(str(mllm_path), device="cpu")
    records = read_split(world_dir, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = evaluate_captions(model, processor, world_dir, records, None, seed, batch_size, max_new_tokens)
    pope = evaluate_pope(model, processor, world_dir, records, seed, batch_size)
    steps = [s for s in noise_steps if s > 0]
    curve = [{k: v for k, v in clean.items() if k != "examples"}]
    curve += noise_curve(model, processor, world_dir, records, steps, seed, batch_size, max_new_tokens)
    (out_dir / "noise_curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    png = plot_noise_curve(curve, out_dir / "noise_curve.png")
    evaluation = {
        "key": key,
        "split": split,
        "model": str(mllm_path),
        "chair": clean,
        "pope": pope,
        "noise_curve": {"png": str(png), "json": str(out_dir / "noise_curve.json"), "points": curve},
    }
    (out_dir / "base_eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    return evaluation
