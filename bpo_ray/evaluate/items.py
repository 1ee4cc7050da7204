"""The one record every benchmark item becomes before it meets the model endpoint.

Rows travel through Ray Data, so everything benchmark-specific (ground-truth objects, POPE label,
MM-Vet capabilities, LLaVA-Bench context) rides in ``meta`` as a JSON string: the Arrow schema stays
flat strings whatever the benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

MAX_RAW_CHARS = 2000  # of a skipped input record kept in skipped.jsonl


@dataclass
class EvalItem:
    id: str  # unique over all benchmarks of one run ("<benchmark>/<source id>")
    benchmark: str
    image: str  # absolute URI: local path or s3://
    question: str  # text the user turn carries beside the image
    reference: str = ""  # ground-truth / reference answer where the benchmark has one
    category: str = ""  # POPE split, MM-Vet capability set, LLaVA-Bench category
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self, max_tokens: int, needs_judge: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "benchmark": self.benchmark,
            "image": self.image,
            "question": self.question,
            "reference": self.reference,
            "category": self.category,
            "meta": json.dumps(self.meta, sort_keys=True),
            "max_tokens": int(max_tokens),
            "needs_judge": bool(needs_judge),
        }


def row_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    meta = row.get("meta") or "{}"
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


@dataclass
class LoadedBenchmark:
    """Items of one benchmark plus what its scorer needs (synonym table, source) and the input
    records it could not use, counted by reason (bad input never vanishes silently)."""

    name: str
    items: list[EvalItem]
    info: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_records: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, reason: str, raw: Any = None) -> None:
        """Count an unusable input record and keep it (truncated) for ``skipped.jsonl``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        text = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True, default=str)
        self.skipped_records.append({"benchmark": self.name, "reason": reason, "raw": text[:MAX_RAW_CHARS]})


@dataclass
class SkipTally:
    """Counts of input records a loader could not use, by reason (they are never dropped silently)."""

    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

