"""Write the bias world to a directory: images, LLaVA-format splits, the prior corpus, world.json.

Layout of ``out_dir``::

    images/scene-000000.png ...   one render per scene
    train.jsonl val.jsonl test.jsonl   LLaVA records; "image" is relative to out_dir; split by scene
    scenes.jsonl                  ground truth per scene: id, image, split, objects (kind, colour, position)
    corpus.txt                    prior-obeying captions, one per line (language-model pretraining)
    world.json                    vocab, synonyms, prior pairs, params, counts, measured co-occurrence

``world.json`` is written last, so its presence with equal ``params`` means a complete build and
``build_world`` returns it without rebuilding.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from typing import Any, Sequence

from bpo_ray.world import vocab
from bpo_ray.world.corpus import partner_cooccurrence, sample_prior_scenes
from bpo_ray.world.scenes import (RECORD_SOURCES, Scene, describe_scene, records_for_scene, render_scene, sample_scene,
                                  with_prior_partners)

WORLD_FORMAT = "bpo-ray/bias-world/3"
SPLITS: tuple[str, ...] = ("train", "val", "test")


# Local filesystem only for now. These two functions are the one seam where s3:// support goes
# (route them through bpo_ray.storage once it lands); nothing else here touches files.
def _write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _png_bytes(scene: Scene, image_size: int) -> bytes:
    buffer = io.BytesIO()
    render_scene(scene, image_size).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode("utf-8")


def scene_annotation(scene: Scene, image: str, split: str) -> dict[str, Any]:
    """The full ground truth of one scene (what the vision pretraining and fine-grained checks use)."""
    return {
        "id": scene.id,
        "image": image,
        "split": split,
        "objects": [{"kind": o.kind, "colour": o.colour, "position": o.position} for o in scene.objects],
    }


def split_scenes(n_scenes: int, seed: int, fractions: Sequence[float]) -> list[str]:
    """Split name of each scene index: a seeded shuffle cut at the cumulative fractions."""
    if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be {len(SPLITS)} numbers summing to 1, got {fractions}")
    order = list(range(n_scenes))
    random.Random(f"bias-world-split:{seed}").shuffle(order)
    cut_train = round(fractions[0] * n_scenes)
    cut_val = cut_train + round(fractions[1] * n_scenes)
    split_of = [""] * n_scenes
    for rank, index in enumerate(order):
        split_of[index] = "train" if rank < cut_train else "val" if rank < cut_val else "test"
    return split_of


def build_world(
    out_dir: str,
    seed: int = 0,
    n_scenes: int = 3000,
    image_size: int = 48,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    corpus_lines: int = 20000,
    partner_rate: float = 0.9,
    object_rate: float = 0.15,
    sources: Sequence[str] = RECORD_SOURCES,
    train_partner_rate: float = 0.0,
) -> dict[str, Any]:
    """Build (or find already built) the bias world in ``out_dir``; returns the world.json content."""
    params = {
        "seed": seed,
        "n_scenes": n_scenes,
        "image_size": image_size,
        "split_fractions": list(split_fractions),
        "corpus_lines": corpus_lines,
        "partner_rate": partner_rate,
        "object_rate": object_rate,
        "sources": list(sources),
        "train_partner_rate": train_partner_rate,
    }
    world_path = os.path.join(out_dir, "world.json")
    if os.path.exists(world_path):
        existing = _read_json(world_path)
        if existing.get("format") == WORLD_FORMAT and existing.get("params") == params:
            return existing

    started = time.perf_counter()
    scene_rng = random.Random(f"bias-world-scenes:{seed}")
    scenes = [sample_scene(scene_rng, f"scene-{i:06d}", object_rate=object_rate) for i in range(n_scenes)]
    split_of = split_scenes(n_scenes, seed, split_fractions)
    if train_partner_rate > 0:
        partner_rng = random.Random(f"bias-world-partners:{seed}")
        scenes = [with_prior_partners(scene, partner_rng, train_partner_rate) if split == "train" else scene
                  for scene, split in zip(scenes, split_of)]

    records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    annotations: list[dict[str, Any]] = []
    scenes_per_split = {split: 0 for split in SPLITS}
    for scene, split in zip(scenes, split_of):
        image = f"images/{scene.id}.png"
        _write_bytes(os.path.join(out_dir, image), _png_bytes(scene, image_size))
        record_rng = random.Random(f"bias-world-records:{seed}:{scene.id}")
        records[split].extend(records_for_scene(scene, image, record_rng, sources))
        scenes_per_split[split] += 1
        annotations.append(scene_annotation(scene, image, split))
    for split in SPLITS:
        _write_bytes(os.path.join(out_dir, f"{split}.jsonl"), _jsonl(records[split]))
    _write_bytes(os.path.join(out_dir, "scenes.jsonl"), _jsonl(annotations))

    prior_scenes = sample_prior_scenes(corpus_lines, seed, partner_rate)
    corpus_text = "".join(describe_scene(scene) + "\n" for scene in prior_scenes)
    _write_bytes(os.path.join(out_dir, "corpus.txt"), corpus_text.encode("utf-8"))

    world = {
        "format": WORLD_FORMAT,
        "params": params,
        "vocab": {
            "objects": list(vocab.OBJECT_KINDS),
            "colours": {name: list(rgb) for name, rgb in vocab.COLOURS.items()},
            "counts": list(vocab.COUNTS),
            "positions": list(vocab.POSITIONS),
            "shapes": dict(vocab.SHAPE_OF_KIND),
            "plurals": dict(vocab.PLURALS),
        },
        "synonyms": dict(vocab.SYNONYMS),
        "prior_pairs": [list(pair) for pair in vocab.PRIOR_PAIRS],
        "counts": {
            "scenes": scenes_per_split,
            "records": {split: len(records[split]) for split in SPLITS},
            "images": n_scenes,
            "corpus_lines": corpus_lines,
        },
        "cooccurrence": {
            "scenes": partner_cooccurrence(scene.kinds for scene in scenes),
            "corpus": partner_cooccurrence(scene.kinds for scene in prior_scenes),
        },
        "files": {
            **{split: f"{split}.jsonl" for split in SPLITS},
            "corpus": "corpus.txt",
            "images": "images/",
            "scenes": "scenes.jsonl",
        },
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    _write_bytes(world_path, (json.dumps(world, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return world
