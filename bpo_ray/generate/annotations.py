"""Training sets derived from Li et al. 2024's annotation dataset (``OUT/annotations/*.parquet``).

The annotation dataset holds, per item, N sampled completions with the judge's five HelpSteer
ratings (``bpo_ray.schemas.ANNOTATION_SCHEMA``). Li et al. 2024 (section 3.2) trains three ways on it;
each function here turns the stored rows into rows of ``PAIR_SCHEMA`` that the existing trainer
reads (``train.mode=dpo`` for the first, ``train.mode=sft`` for the others, which trains on
``chosen`` only; ``rejected`` is then the chosen text again and is not used):

- ``dpo_pairs``: the best completion (summed helpfulness + correctness + coherence) against a
  seeded random other, kept with at least ``min_gap`` between them: the same rule and the same
  seeds as the ``judge_ranked`` strategy, so they equal the pairs the generate job wrote.
- ``rejection_sampling_rows``: SFT on the top-scoring completion, with the plain prompt
  (Constitutional AI / LLaMA-2's simplified rejection sampling, as the paper adopts it).
- ``steerlm_rows``: SFT on every completion with its five ratings written into the prompt
  (SteerLM, Dong et al. 2023: attribute-conditioned SFT); ``bpo_ray.models.steerlm.steer_prompt``
  is the one place the conditioned prompt is built, so the served model (request field
  ``steer_attributes``) is asked for the desired attributes exactly as it was trained.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Mapping, Optional

import pyarrow as pa

from bpo_ray.config.generate import FilterConfig
from bpo_ray.generate.judge_ranked import METRICS, choose_pair
from bpo_ray.generate.pairs import filter_reason
from bpo_ray.generate.seeds import derive_seed
from bpo_ray.models.steerlm import steer_prompt
from bpo_ray.schemas import HELPSTEER_ATTRIBUTES, pair_id, pairs_table

STRATEGY_REJECTION = "rejection_sampling"
STRATEGY_STEERLM = "steerlm"


def _by_item(table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    items: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        items[row["source_id"]].append(row)
    for rows in items.values():
        rows.sort(key=lambda r: r["completion_index"])
    return dict(sorted(items.items()))


def total(row: Mapping[str, Any]) -> float:
    """Li et al. 2024's aggregate: helpfulness + correctness + coherence."""
    return float(sum(row[m] for m in METRICS))


def _sampling(row: Mapping[str, Any], **extra: Any) -> str:
    return json.dumps({**json.loads(row["sampling"]), **extra}, sort_keys=True)


def _row(first: Mapping[str, Any], strategy: str, prompt: str, chosen: str, rejected: str, seed: int,
         sampling: str) -> dict[str, Any]:
    params = {"noise_step": None, "generator": first["generator"], "sampling": sampling, "seed": seed}
    return {"id": pair_id(first["source_id"], strategy, params), "source": first["source"],
            "source_id": first["source_id"], "image": first["image"], "image_sha256": first["image_sha256"],
            "prompt": prompt, "chosen": chosen, "rejected": rejected, "strategy": strategy, "noise_step": None,
            "generator": first["generator"], "sampling": sampling, "seed": int(seed),
            "ref_chosen_logp": None, "ref_rejected_logp": None}


def dpo_pairs(table: pa.Table, min_gap: float, seed: int, draw: str = "among_worse",
              filters: Optional[FilterConfig] = None) -> pa.Table:
    """Li et al. 2024's DPO pairs from the annotations (``choose_pair`` with the generate job's seeds);
    with the job's ``filters`` they are exactly the ``judge_ranked`` pairs it wrote."""
    rows = []
    for source_id, comps in _by_item(table).items():
        totals = [total(r) for r in comps]
        pick = choose_pair(totals, min_gap, derive_seed(seed, "pick", source_id), draw)
        if pick is None:
            continue
        best, worse = comps[pick[0]], comps[pick[1]]
        if filters is not None and filter_reason(best["completion"], worse["completion"], filters):
            continue
        sampling = _sampling(worse, chosen_score=totals[pick[0]], rejected_score=totals[pick[1]], scores=totals)
        rows.append(_row(worse, "judge_ranked", worse["prompt"], best["completion"],
                         worse["completion"].strip(), worse["seed"], sampling))
    return pairs_table(rows)


def rejection_sampling_rows(table: pa.Table, min_total: float = 0.0) -> pa.Table:
    """One SFT row per item: its top-scoring completion (first on ties), plain prompt; items whose
    best total is below ``min_total`` are left out."""
    rows = []
    for comps in _by_item(table).values():
        best = max(comps, key=lambda r: (total(r), -r["completion_index"]))
        if total(best) < min_total or not best["completion"].strip():
            continue
        text = best["completion"].strip()
        rows.append(_row(best, STRATEGY_REJECTION, best["prompt"], text, text, best["seed"],
                         _sampling(best, score=total(best))))
    return pairs_table(rows)


def steerlm_rows(table: pa.Table) -> pa.Table:
    """One SFT row per rated, non-empty completion: the prompt carries the completion's own five
    ratings (``bpo_ray.models.steerlm.steer_prompt``), so the model learns to answer as the attributes ask."""
    rows = []
    for comps in _by_item(table).values():
        for r in comps:
            text = r["completion"].strip()
            if not text:
                continue
            attrs = {a: r[a] for a in HELPSTEER_ATTRIBUTES}
            rows.append(_row(r, STRATEGY_STEERLM, steer_prompt(r["prompt"], attrs), text, text, r["seed"],
                             _sampling(r, attributes=attrs)))
    return pairs_table(rows)


def subsample(table: pa.Table, fraction: float, seed: int) -> pa.Table:
    """A deterministic ``fraction`` of the rows (Li et al. 2024's data-size curve, Fig. 2): rows ranked by a
    seeded hash of their id, the first ``round(fraction * n)`` kept, so 25 % is inside 50 %."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ids = table.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: (derive_seed(seed, "subsample", ids[i]), i))
    keep = sorted(order[:round(fraction * len(ids))])
    return table.take(pa.array(keep, type=pa.int64()))


def describe(table: Optional[pa.Table]) -> dict[str, float]:
    """Mean of each attribute over an annotation table (for manifests and reports)."""
    if table is None or table.num_rows == 0:
        return {}
    return {a: sum(table.column(a).to_pylist()) / table.num_rows for a in HELPSTEER_ATTRIBUTES}
