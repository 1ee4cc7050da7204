"""Held-out validation during training: a DPO run that starts to collapse says so, and the adapter
it exports is the best one it validated, not merely the last.

Pairs are held out by the driver (``data.held_out_rows``: by a hash of the pair id, so the same
pairs on every run and resume). Every ``train.validation.every_steps`` optimizer steps, and at the
last one, each Ray Train worker scores its share of them (rows ``rank, rank + world, ...``) with
the training step's own code under ``no_grad``: policy and reference log-probs (the reference is
the precomputed columns or the adapter switched off), the preference loss and implicit rewards.
The sums are all-reduced, so every worker sees the same means, and rank 0's are broadcast so every
decision below is the same on every rank (ZeRO-3 gathers the adapter collectively).

Metrics (``val_*``, per held-out pair) go into that step's record in ``metrics.jsonl`` and
to ``ray.train.report``. When the mean chosen log-prob minus the reference's falls below
``-chosen_drop_warn`` the record gets ``val_collapse: true`` and the console a ``WARNING collapse``
line; past ``chosen_drop_stop`` training stops (checkpoint and export at that step).

With ``keep_best`` the adapter of each new best step is written to
``OUT/validation/best-step-<k>/adapter`` and then ``OUT/validation/best.json`` points to it (the
previous best is deleted afterwards, so the pointer always names a complete adapter). At the end
``OUT/adapter`` is that adapter and ``OUT/adapter_last`` the last step's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

from bpo_ray import storage
from bpo_ray.config.train import ValidationConfig

VALIDATION_DIR = "validation"
BEST_FILE = "best.json"


def batches(n_rows: int, world: int, rank: int, micro: int) -> list[list[int]]:
    """This rank's micro-batches of held-out rows (``rank, rank + world, ...``).

    Every rank gets the same number of batches, an empty one where its share ran out (the caller
    runs a throwaway forward for it): under ZeRO-3 every forward pass is a collective.
    """
    mine = list(range(rank, n_rows, world))
    count = math.ceil(math.ceil(n_rows / world) / micro)
    return [mine[b * micro:(b + 1) * micro] for b in range(count)]


def summarise(sums: dict[str, float]) -> dict[str, float]:
    """``val_*`` means per held-out pair from the training step's stats summed over every pair."""
    n = sums["n"]
    means = {k: v / n for k, v in sums.items() if k != "n"}
    out = {f"val_{k}": v for k, v in means.items()}
    out["val_chosen_logp_delta"] = means["chosen_logp"] - means["ref_chosen_logp"]
    out["val_rejected_logp_delta"] = means["rejected_logp"] - means["ref_rejected_logp"]
    out["val_pairs"] = int(n)
    return out


def chosen_drop(cfg: ValidationConfig, val: dict, step: int) -> tuple[bool, bool, Optional[str]]:
    """``(warn, stop, console line)``: has the held-out chosen log-prob fallen past the margins?"""
    drop = -val["val_chosen_logp_delta"]
    warn = cfg.chosen_drop_warn is not None and drop > cfg.chosen_drop_warn
    stop = cfg.chosen_drop_stop is not None and drop > cfg.chosen_drop_stop
    if not (warn or stop):
        return False, False, None
    margin = cfg.chosen_drop_warn if cfg.chosen_drop_warn is not None else cfg.chosen_drop_stop
    line = (f"WARNING collapse: chosen log-prob fell {drop:.2f} nats below the reference (margin {margin:g}) "
            f"at step {step} (mean over {val['val_pairs']} held-out pairs)")
    if stop:
        line += f"; stopping: past train.validation.chosen_drop_stop={cfg.chosen_drop_stop:g}"
    return warn or stop, stop, line


@dataclass
class BestRecord:
    """The best validated step so far, as ``OUT/validation/best.json`` holds it."""

    step: int
    value: float
    metric: str
    mode: str
    dir: str  # below OUT/validation: best-step-<k>


class BestAdapter:
    """Tracks the best step by ``cfg.metric`` / ``cfg.direction`` and keeps its adapter in storage."""

    def __init__(self, cfg: ValidationConfig, out_uri: str):
        self.cfg, self.root = cfg, storage.join(out_uri, VALIDATION_DIR)
        self.record: Optional[BestRecord] = None

    def adapter_uri(self, record: BestRecord) -> str:
        return storage.join(self.root, record.dir, "adapter")

    def load(self) -> Optional[BestRecord]:
        """The record a previous attempt of this run left, if it was made with the same metric."""
        uri = storage.join(self.root, BEST_FILE)
        if not storage.exists(uri):
            return None
        record = BestRecord(**json.loads(storage.read_text(uri)))
        same = (record.metric, record.mode) == (self.cfg.metric, self.cfg.direction)
        if same and storage.exists(storage.join(self.adapter_uri(record), "adapter_model.safetensors")):
            self.record = record
        return self.record

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.record is None:
            return True
        return value > self.record.value if self.cfg.direction == "max" else value < self.record.value

    def save(self, local_adapter: str, step: int, value: float) -> None:
        """Rank 0: upload the adapter, then point ``best.json`` at it, then drop the previous one."""
        previous = self.record
        record = BestRecord(step, value, self.cfg.metric, self.cfg.direction, f"best-step-{step:06d}")
        storage.upload_dir(local_adapter, self.adapter_uri(record))
        storage.write_text(storage.join(self.root, BEST_FILE), json.dumps(asdict(record), indent=2))
        self.record = record
        if previous is not None and previous.dir != record.dir:
            storage.delete(storage.join(self.root, previous.dir))


def summary(cfg: ValidationConfig, out_uri: str, records: list[dict], held_out: int) -> dict:
    """What the train manifest says about validation: where it ran, the collapse warnings, and
    which step's adapter ``OUT/adapter`` is."""
    validated = [r for r in records if "val_loss" in r]
    best = BestAdapter(cfg, out_uri).load() if cfg.keep_best else None
    last = records[-1]["step"] if records else None
    return {
        "held_out_pairs": held_out,
        "metric": cfg.metric,
        "mode": cfg.direction,
        "validated_steps": [r["step"] for r in validated],
        "collapse_steps": [r["step"] for r in validated if r.get("val_collapse")],
        "stopped_at_step": next((r["step"] for r in validated if r.get("stopped") == "collapse"), None),
        "adapter": "best" if best is not None else "last",
        "adapter_step": best.step if best is not None else last,
        "adapter_metric_value": best.value if best is not None else
        next((r[f"val_{cfg.metric}"] for r in validated if r["step"] == last), None),
        "last_step": last,
    }
