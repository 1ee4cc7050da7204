"""Preference pairs from items and their negatives, with filters and exact per-item outcomes.

BPO pairs the ground-truth answer (chosen, paper section 3) with each bootstrapped negative
(rejected): ``(x, y_w = y_gt, y_l = y_neg)`` is what the DPO loss (paper Eq. 4) consumes.
Judge-ranked and on-policy pairs bring their own chosen answer (on-policy sentence-level pairs
also their own prompt: the item's prompt plus the shared grounded prefix). Degenerate negatives are dropped and counted:

- ``empty``: shorter than ``min_chars`` after stripping;
- ``identical_to_chosen``: equal to the chosen answer up to case, spacing and punctuation;
- ``duplicate_negative``: equal to an earlier negative of the same item;
- ``no_content_change``: the same multiset of content words as the chosen answer (only function
  words or word order changed, so there is no error to learn from);
- ``length_ratio``: word counts (floored at ``length_floor_words``) differ by more than
  ``max_length_ratio`` times.

Judge-ranked negatives also carry the item's annotations (every rated completion, Li et al. 2024's
annotation dataset); they are passed on as ``annotation_row`` rows whether or not a pair survives.

Each item ends in exactly one outcome: ``paired`` (at least one pair), ``filtered`` (negatives
were generated, all dropped) or ``quarantined`` (bad input, or no negative could be generated).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np

from bpo_ray.config.generate import FilterConfig
from bpo_ray.schemas import HELPSTEER_ATTRIBUTES, pair_id

_WORD = re.compile(r"[^\W_]+", re.UNICODE)

# Function words; negations, yes/no, numbers, colours and nouns are content and so never here.
STOPWORDS = frozenset("""
a an the this that these those there here it its it's is are was were be been being am do does did
of in on at to from by with for as into onto over under about above below between near and or but
so then than also too very just some any each both all i you he she we they them his her their our
your my me us him what which who whom whose where when how why can could would should will shall
may might must has have had having image picture photo shows shown see seen visible
""".split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_words(text: str) -> Counter:
    return Counter(w for w in words(text) if w not in STOPWORDS)


def normalise(text: str) -> str:
    return " ".join(words(text))


def filter_reason(chosen: str, rejected: str, cfg: FilterConfig, earlier: Sequence[str] = ()) -> Optional[str]:
    """Why ``rejected`` is not a usable negative for ``chosen``, or ``None`` if it is."""
    if len(rejected.strip()) < max(1, cfg.min_chars):
        return "empty"
    norm = normalise(rejected)
    if norm == normalise(chosen):
        return "identical_to_chosen"
    if norm in {normalise(e) for e in earlier}:
        return "duplicate_negative"
    if cfg.require_content_change and content_words(rejected) == content_words(chosen):
        return "no_content_change"
    a = max(len(words(chosen)), cfg.length_floor_words)
    b = max(len(words(rejected)), cfg.length_floor_words)
    if max(a, b) / min(a, b) > cfg.max_length_ratio:
        return "length_ratio"
    return None


def pair_row(item: dict[str, Any], strategy: str, negative: dict[str, Any], chosen: str) -> dict[str, Any]:
    """One row of ``PAIR_SCHEMA`` (reference log-probs stay null until the reference pass)."""
    sampling = json.dumps(negative["sampling"], sort_keys=True)
    params = {"noise_step": negative.get("noise_step"), "generator": negative["generator"],
              "sampling": sampling, "seed": negative["seed"]}
    return {
        "id": pair_id(item["item_id"], strategy, params),
        "source": item["source"], "source_id": item["item_id"], "image": item["image_uri"],
        "image_sha256": item["image_sha256"], "prompt": negative.get("prompt", item["llava_prompt"]), "chosen": chosen,
        "rejected": negative["text"].strip(), "strategy": strategy, "noise_step": negative.get("noise_step"),
        "generator": negative["generator"], "sampling": sampling, "seed": int(negative["seed"]),
        "ref_chosen_logp": None, "ref_rejected_logp": None,
    }


def annotation_row(item: dict[str, Any], negative: dict[str, Any], ann: dict[str, Any]) -> dict[str, Any]:
    """One row of ``ANNOTATION_SCHEMA``: a rated completion of ``item`` with its provenance."""
    sampling = json.dumps(negative["annotation_sampling"], sort_keys=True)
    params = {"completion_index": ann["completion_index"], "generator": negative["generator"],
              "judge_model": negative["judge_model"], "sampling": sampling, "seed": ann["seed"]}
    return {
        "id": pair_id(item["item_id"], "annotation", params), "source": item["source"],
        "source_id": item["item_id"], "image": item["image_uri"], "image_sha256": item["image_sha256"],
        "prompt": item["llava_prompt"], "question": item["question"], "reference": item["answer"],
        **{k: ann[k] for k in ("completion_index", "completion", *HELPSTEER_ATTRIBUTES, "reasoning", "seed")},
        "judge_model": negative["judge_model"], "generator": negative["generator"], "sampling": sampling,
    }


def item_outcome(item: dict[str, Any], strategies: Sequence[str], cfg: FilterConfig) -> dict[str, Any]:
    """``{"outcome", "pairs", "annotations", "quarantine", "reasons"}`` for one item row (reasons
    are counted)."""
    if item["status"] != "ok":
        return {"outcome": "quarantined", "pairs": [], "annotations": [],
                "reasons": [f"quarantine.{item['reason']}"],
                "quarantine": {"source_id": item["item_id"], "stage": item["stage"] or "read",
                               "reason": item["reason"], "raw": item.get("raw") or ""}}
    pairs: list[dict] = []
    annotations: list[dict] = []
    reasons: list[str] = []
    failures: list[tuple[str, str]] = []
    generated = 0
    for strategy in strategies:
        kept: list[str] = []
        for neg in json.loads(item[f"neg_{strategy}"]):
            # Verifier work behind this negative (judge calls, cache hits): counted as stat.<name>.
            for name, n in (neg.get("stats") or {}).items():
                reasons += [f"stat.{name}"] * int(n)
            if "failed" in neg:
                failures.append((strategy, neg["failed"]))
                continue
            generated += 1
            annotations += [annotation_row(item, neg, a) for a in neg.get("annotations", ())]
            reasons += ["judge.retry"] * int(neg.get("judge_retries", 0))
            if "filtered" in neg:
                reasons.append(f"filter.{neg['filtered']}")
                continue
            chosen = neg.get("chosen", item["answer"])
            why = filter_reason(chosen, neg["text"], cfg, kept)
            kept.append(neg["text"])
            if why:
                reasons.append(f"filter.{why}")
            else:
                pairs.append(pair_row(item, strategy, neg, chosen))
    if not generated:
        stage, reason = failures[0] if failures else ("generate", "no_negative_generated")
        return {"outcome": "quarantined", "pairs": [], "annotations": [], "reasons": [f"quarantine.{reason}"],
                "quarantine": {"source_id": item["item_id"], "stage": stage, "reason": reason,
                               "raw": json.dumps({"question": item["question"], "answer": item["answer"],
                                                  "image": item["image_uri"]})}}
    reasons += [f"failed.{reason}" for _, reason in failures]
    return {"outcome": "paired" if pairs else "filtered", "pairs": pairs, "annotations": annotations,
            "quarantine": None, "reasons": reasons}


def build_outcomes(batch: dict[str, np.ndarray], strategies: Sequence[str], filters: dict) -> dict[str, Any]:
    """Ray Data stage: per item row, its outcome and pairs as JSON (the driver groups by shard)."""
    cfg = FilterConfig(**filters)
    keys = list(batch.keys())
    n = len(batch["order"])
    out: dict[str, list] = {"order": [], "shard": [], "outcome": [], "result": []}
    for i in range(n):
        item = {k: batch[k][i] for k in keys}
        result = item_outcome(item, strategies, cfg)
        out["order"].append(int(item["order"]))
        out["shard"].append(int(item["shard"]))
        out["outcome"].append(result["outcome"])
        out["result"].append(json.dumps(result))
    return {"order": np.array(out["order"], dtype=np.int64), "shard": np.array(out["shard"], dtype=np.int64),
            "outcome": np.array(out["outcome"], dtype=object), "result": np.array(out["result"], dtype=object)}
