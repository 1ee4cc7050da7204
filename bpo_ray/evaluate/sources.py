"""Reading benchmark files (local or s3://) and the bias world's test split.

Public benchmark files are JSON or JSON Lines; POPE ships JSON Lines under a ``.json`` name, so
``read_records`` accepts either whatever the suffix says.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from bpo_ray import storage
from bpo_ray.images import resolve_image_uri


class BenchmarkDataError(ValueError):
    """A benchmark file is missing or unreadable as a whole (single bad records are skipped)."""


def read_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_text(uri))
    except storage.StorageError as exc:
        raise BenchmarkDataError(f"cannot read {uri}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BenchmarkDataError(f"{uri} is not valid JSON: {exc}") from exc


def read_records(uri: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of a JSON array or a JSON Lines file; returns ``(records, unusable entries as text)``."""
    try:
        text = storage.read_text(uri)
    except storage.StorageError as exc:
        raise BenchmarkDataError(f"cannot read {uri}: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchmarkDataError(f"{uri} is not valid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise BenchmarkDataError(f"{uri}: expected a JSON array or JSON Lines")
        return [r for r in data if isinstance(r, dict)], [json.dumps(r) for r in data if not isinstance(r, dict)]
    records: list[dict[str, Any]] = []
    bad: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(line)
    return records, bad


def absolute_uri(path: str) -> str:
    """Local paths become absolute (Ray workers may run elsewhere in the tree); URIs pass through."""
    return path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))


@dataclass
class WorldSplit:
    """One split of the bias world: its records (``image`` made absolute) and world.json."""

    root: str
    records: list[dict[str, Any]]
    world: dict[str, Any]

    @property
    def synonyms(self) -> dict[str, str]:
        from bpo_ray.world import vocab

        return dict(self.world.get("synonyms") or vocab.SYNONYMS)

    @property
    def objects(self) -> list[str]:
        from bpo_ray.world import vocab

        return list(self.world.get("vocab", {}).get("objects") or vocab.OBJECT_KINDS)

    @property
    def prior_partners(self) -> dict[str, str]:
        pairs = self.world.get("prior_pairs")
        if not pairs:
            from bpo_ray.world import vocab

            return vocab.prior_partners()
        partners: dict[str, str] = {}
        for first, second in pairs:
            partners[first], partners[second] = second, first
        return partners


def load_world_split(world_dir: str, split: str = "test", require_sources: Optional[set[str]] = None) -> WorldSplit:
    """Read ``<world_dir>/<split>.jsonl`` and ``world.json`` (built by ``bpo-ray world``)."""
    root = absolute_uri(world_dir)
    world_json = storage.join(root, "world.json")
    if not storage.exists(world_json):
        raise BenchmarkDataError(f"no bias world at {root} (world.json missing): run `bpo-ray world` first")
    world = read_json(world_json)
    records, _ = read_records(storage.join(root, world.get("files", {}).get(split, f"{split}.jsonl")))
    for record in records:
        record["image"] = resolve_image_uri(record["image"], root)
    if require_sources:
        records = [r for r in records if r.get("source") in require_sources]
    return WorldSplit(root, records, world)


def first_human_turn(record: dict[str, Any]) -> tuple[str, str]:
    """``(question, answer)`` of a LLaVA record's first turn, image placeholder removed."""
    from bpo_ray.models.prompts import strip_image_token

    turns = record.get("conversations") or []
    question = next((t["value"] for t in turns if t.get("from") == "human"), "")
    answer = next((t["value"] for t in turns if t.get("from") == "gpt"), "")
    return strip_image_token(question), answer
