"""Preference pairs over bias-world images for the train-stage tests (not a test module).

chosen = the world's ground-truth answer; rejected = the same answer with its objects or colours
swapped for their prior partners / other colours (the kind of error BPO's injector produces), or
Yes/No flipped. Built with ``bpo_ray.schemas.pairs_table`` so they satisfy the real contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from bpo_ray.schemas import pair_id, pairs_table, write_parquet, PAIR_SCHEMA
from bpo_ray.world.build import build_world
from bpo_ray.world.vocab import COLOURS, PRIOR_PAIRS

_PARTNER = {a: b for a, b in PRIOR_PAIRS} | {b: a for a, b in PRIOR_PAIRS}
_COLOUR_NAMES = list(COLOURS)
_NEXT_COLOUR = {c: _COLOUR_NAMES[(i + 1) % len(_COLOUR_NAMES)] for i, c in enumerate(_COLOUR_NAMES)}
_WORD = re.compile(r"[A-Za-z]+")


def corrupt(answer: str) -> str:
    if answer in ("Yes.", "No."):
        return "No." if answer == "Yes." else "Yes."
    def swap(m: re.Match) -> str:
        w = m.group(0)
        return _PARTNER.get(w, _NEXT_COLOUR.get(w, w))
    out = _WORD.sub(swap, answer)
    return out if out != answer else answer + " There is also a saucer."


def build_pairs_rows(world_dir: str, n_scenes: int = 40, seed: int = 0, limit: int | None = None) -> list[dict]:
    build_world(world_dir, seed=seed, n_scenes=n_scenes, corpus_lines=200)
    rows = []
    with open(os.path.join(world_dir, "train.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            conv = rec["conversations"]
            question, answer = conv[0]["value"], conv[1]["value"]
            image = os.path.abspath(os.path.join(world_dir, rec["image"]))
            with open(image, "rb") as img:
                sha = hashlib.sha256(img.read()).hexdigest()
            rows.append({
                "id": pair_id(rec["id"], "error_injection", {"test": 1}),
                "source": "bias_world", "source_id": rec["id"], "image": image, "image_sha256": sha,
                "prompt": question, "chosen": answer, "rejected": corrupt(answer),
                "strategy": "error_injection", "noise_step": None, "generator": "test-corruptor",
                "sampling": "{}", "seed": seed,
            })
    return rows[:limit] if limit else rows


def write_pairs(rows: list[dict], out_dir: str) -> str:
    """Write ``out_dir/pairs/part-0.parquet`` (the generate stage's layout); returns ``out_dir``."""
    write_parquet(pairs_table(rows), os.path.join(out_dir, "pairs", "part-0.parquet"), PAIR_SCHEMA)
    return out_dir


def records_by_attempt(out: str) -> list[list[dict]]:
    """A training run's ``metrics.jsonl`` split at each (re)start event: one list per attempt, its
    start record first."""
    from bpo_ray import storage

    attempts: list[list[dict]] = []
    for line in storage.read_text(storage.join(out, "metrics.jsonl")).splitlines():
        record = json.loads(line)
        if record.get("event") == "start":
            attempts.append([record])
        else:
            attempts[-1].append(record)
    return attempts
