"""Resumable output: items are cut into deterministic shards, each committed atomically.

Layout under ``--out`` (local or s3://)::

    pairs/shard-00003.parquet        PAIR_SCHEMA rows of shard 3 (absent if it has none)
    annotations/shard-00003.parquet  ANNOTATION_SCHEMA rows (judge_ranked's rated completions; absent if none)
    quarantine/shard-00003.parquet   QUARANTINE_SCHEMA rows of shard 3 (absent if none)
    _progress/plan.json              what the run is (config + item ids); a rerun must match it
    _progress/shard-00003.json       done marker: counts and item orders per outcome

A shard's Parquet files are written first (whole-file writes: temp + rename locally, one PUT on
S3), its marker last. A rerun skips shards with a marker and rewrites the others under the same
names, so a killed job finishes without duplicated or lost rows; the manifest is the sum of the
markers.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from typing import Any, Iterable, Iterator, Optional

import pyarrow.parquet as pq

from bpo_ray import storage
from bpo_ray.schemas import ManifestCounts, annotations_table, pairs_table, quarantine_table

PROGRESS = "_progress"


class PlanMismatch(RuntimeError):
    """``--out`` holds a run of a different plan (config or input changed)."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def plan_fingerprint(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _parquet_bytes(table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class ShardStore:
    """Reads and commits the shards of one ``--out``."""

    def __init__(self, out: str):
        self.out = out.rstrip("/")

    def uri(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def marker_uri(self, shard: int) -> str:
        return self.uri(PROGRESS, f"{shard_name(shard)}.json")

    def clear(self) -> None:
        """Delete every output of an earlier run under ``out`` (``--restart``)."""
        for part in ("pairs", "annotations", "quarantine", PROGRESS, "manifest.json"):
            storage.delete(self.uri(part))

    def check_or_write_plan(self, plan: dict[str, Any]) -> bool:
        """Record the plan, or check it against the recorded one; True if resuming."""
        uri = self.uri(PROGRESS, "plan.json")
        fingerprint = plan_fingerprint(plan)
        if storage.exists(uri):
            old = json.loads(storage.read_text(uri))
            if old.get("fingerprint") != fingerprint:
                changed = sorted(k for k in set(plan) | set(old.get("plan", {}))
                                 if json.dumps(plan.get(k), sort_keys=True, default=str)
                                 != json.dumps(old.get("plan", {}).get(k), sort_keys=True, default=str))
                raise PlanMismatch(f"{self.out} holds a run with a different plan (changed: {', '.join(changed)}); "
                                   "use a new --out, or --restart to discard it")
            return True
        storage.write_text(uri, json.dumps({"fingerprint": fingerprint, "plan": plan}, indent=1, default=str))
        return False

    def done_shards(self) -> set[int]:
        done = set()
        for f in storage.list_files(self.uri(PROGRESS), suffix=".json"):
            name = f.rsplit("/", 1)[-1]
            if name.startswith("shard-"):
                done.add(int(name[len("shard-"):-len(".json")]))
        return done

    def commit(self, shard: int, results: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Write one shard's pairs and quarantine rows, then its marker; returns the marker."""
        results = sorted(results, key=lambda r: r["order"])
        pairs = [p for r in results for p in r["pairs"]]
        quarantine = [r["quarantine"] for r in results if r["quarantine"]]
        annotations = [a for r in results for a in r.get("annotations", ())]
        files = []
        if pairs:
            uri = self.uri("pairs", f"{shard_name(shard)}.parquet")
            storage.write_bytes(uri, _parquet_bytes(pairs_table(pairs)))
            files.append(uri)
        if annotations:
            uri = self.uri("annotations", f"{shard_name(shard)}.parquet")
            storage.write_bytes(uri, _parquet_bytes(annotations_table(annotations)))
            files.append(uri)
        if quarantine:
            uri = self.uri("quarantine", f"{shard_name(shard)}.parquet")
            storage.write_bytes(uri, _parquet_bytes(quarantine_table(quarantine)))
            files.append(uri)
        outcomes: dict[str, list[int]] = {"paired": [], "filtered": [], "quarantined": []}
        reasons: Counter = Counter()
        for r in results:
            outcomes[r["outcome"]].append(r["order"])
            reasons.update(r["reasons"])
        marker = {
            "shard": shard, "items_in": len(results), "paired": len(outcomes["paired"]),
            "filtered": len(outcomes["filtered"]), "quarantined": len(outcomes["quarantined"]),
            "pairs_written": len(pairs), "annotations_written": len(annotations), "by_reason": dict(sorted(reasons.items())),
            "by_strategy": dict(sorted(Counter(p["strategy"] for p in pairs).items())),
            "orders": outcomes, "files": files,
        }
        storage.write_text(self.marker_uri(shard), json.dumps(marker))
        return marker

    def markers(self) -> list[dict[str, Any]]:
        return list(self.iter_markers())

    def iter_markers(self) -> Iterator[dict[str, Any]]:
        """The markers one at a time, in shard order (a marker lists its items: keep few in memory)."""
        for s in sorted(self.done_shards()):
            yield json.loads(storage.read_text(self.marker_uri(s)))


def total_counts(markers: Iterable[dict[str, Any]], expected_items: Optional[int] = None) -> ManifestCounts:
    """Sum of the shard markers (ManifestCounts checks in = paired + filtered + quarantined)."""
    keys = ("items_in", "paired", "filtered", "quarantined", "pairs_written")
    totals = {k: 0 for k in keys}
    by_reason: Counter = Counter()
    by_strategy: Counter = Counter()
    annotations = 0
    for m in markers:
        for k in keys:
            totals[k] += m[k]
        annotations += m.get("annotations_written", 0)
        by_reason.update(m["by_reason"])
        by_strategy.update(m["by_strategy"])
    if expected_items is not None and totals["items_in"] != expected_items:
        raise RuntimeError(f"shards account for {totals['items_in']} items but the source has {expected_items}")
    return ManifestCounts(**totals, annotations_written=annotations, by_reason=dict(sorted(by_reason.items())),
                          by_strategy=dict(sorted(by_strategy.items())))
