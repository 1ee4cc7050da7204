"""``bpo-ray derive``: Li et al. 2024's training sets from the annotation dataset, as pair-format Parquet.

    bpo-ray derive --annotations runs/p002/generate --method rejection_sampling --out runs/p002/rs
    bpo-ray derive --annotations runs/p002/generate --method steerlm --out runs/p002/steerlm
    bpo-ray derive --annotations runs/p002/generate --method dpo --fraction 0.25 --out runs/p002/dpo25
    bpo-ray derive --annotations runs/p002/generate --method judge_answer --judge-url http://127.0.0.1:8000/judge/v1 \\
        --judge-token-env BPO_JUDGE_TOKEN --out runs/p002/judge_sft

``--annotations`` is a generate output dir (its ``annotations/``) or the annotations dir itself.
Writes ``OUT/pairs/part-00000.parquet`` (``PAIR_SCHEMA``; ``bpo-ray train`` reads it, with
``train.mode=sft`` for every method but ``dpo``), ``OUT/quarantine/`` (judge_answer failures) and
``OUT/manifest.json``: every annotated item is counted once, as ``paired`` (it has rows),
``filtered`` (the method's rule left it out: no score gap, below ``--min-total``, or not drawn by
``--fraction``) or ``quarantined``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from typing import Optional, Sequence

import pyarrow.parquet as pq

from bpo_ray import storage
from bpo_ray.config.generate import FilterConfig
from bpo_ray.generate import annotations as ann
from bpo_ray.schemas import (ANNOTATION_SCHEMA, Manifest, ManifestCounts, SchemaError, library_versions,
                             read_parquet, write_manifest)

METHODS = ("dpo", "rejection_sampling", "steerlm", "judge_answer")


def annotations_location(uri: str) -> str:
    nested = storage.join(uri, "annotations")
    return nested if storage.exists(nested) else uri


def _write(table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def derive(method: str, annotations_uri: str, out: str, *, fraction: float = 1.0, seed: int = 0,
           min_gap: float = 2.0, draw: str = "among_worse", min_total: float = 0.0,
           judge_url: Optional[str] = None, judge_model: str = "gpt-4", judge_token_env: str = "BPO_JUDGE_TOKEN",
           judge_max_retries: int = 3) -> Manifest:
    """Write ``method``'s training set from the annotations at ``annotations_uri`` to ``out``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    t0 = time.perf_counter()
    location = annotations_location(annotations_uri)
    if not storage.exists(location) or not storage.list_files(location, ".parquet"):
        raise ValueError(f"no annotations at {annotations_uri} (run generate with strategy judge_ranked)")
    table = read_parquet(location, ANNOTATION_SCHEMA)
    items = sorted(set(table.column("source_id").to_pylist()))
    quarantined = 0
    by_reason: dict[str, int] = {}
    if method == "dpo":
        rows = ann.dpo_pairs(table, min_gap, seed, draw, FilterConfig())
    elif method == "rejection_sampling":
        rows = ann.rejection_sampling_rows(table, min_total)
    elif method == "steerlm":
        rows = ann.steerlm_rows(table)
    else:
        from bpo_ray.generate.judge_answers import judge_answer_rows

        if not judge_url:
            raise ValueError("method judge_answer needs --judge-url (an OpenAI-compatible base URL)")
        got = judge_answer_rows(table, judge_url, judge_model, judge_token_env, max_retries=judge_max_retries)
        rows = got.rows
        quarantined = got.quarantine.num_rows
        by_reason = {k: v for k, v in got.counts.items() if k.startswith("quarantine.")}
        if quarantined:
            _write(got.quarantine, storage.join(out, "quarantine", "part-00000.parquet"))
    if fraction < 1.0:
        rows = ann.subsample(rows, fraction, seed)
    storage.delete(storage.join(out, "pairs"))
    if rows.num_rows:
        _write(rows, storage.join(out, "pairs", "part-00000.parquet"))
    paired = len(set(rows.column("source_id").to_pylist()))
    counts = ManifestCounts(items_in=len(items), paired=paired, filtered=len(items) - paired - quarantined,
                            quarantined=quarantined, pairs_written=rows.num_rows,
                            annotations_written=table.num_rows, by_reason=by_reason,
                            by_strategy={method: rows.num_rows} if rows.num_rows else {})
    manifest = Manifest(stage="derive", counts=counts, versions=library_versions(),
                        config={"method": method, "annotations": annotations_uri, "out": out, "fraction": fraction,
                                "seed": seed, "min_gap": min_gap, "draw": draw, "min_total": min_total,
                                "judge_url": judge_url, "judge_model": judge_model},
                        timings={"total_s": time.perf_counter() - t0})
    write_manifest(manifest, storage.join(out, "manifest.json"))
    return manifest


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bpo-ray derive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotations", required=True, help="generate output dir or its annotations/ (local or s3://)")
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--out", required=True, help="output dir/URI")
    ap.add_argument("--fraction", type=float, default=1.0, help="keep this share of the rows (data-size curve)")
    ap.add_argument("--seed", type=int, default=0, help="the generate run's seed (pair draw) and the subsample's")
    ap.add_argument("--min-gap", type=float, default=2.0, help="dpo: least summed-score gap (paper: 2)")
    ap.add_argument("--draw", choices=("among_worse", "any_other"), default="among_worse")
    ap.add_argument("--min-total", type=float, default=0.0, help="rejection_sampling: least best total")
    ap.add_argument("--judge-url", default=None, help="judge_answer: OpenAI-compatible base URL")
    ap.add_argument("--judge-model", default="gpt-4")
    ap.add_argument("--judge-token-env", default="BPO_JUDGE_TOKEN", help="env var holding this client's judge-proxy token")
    return ap


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if not 0 < args.fraction <= 1:
        print("bpo-ray derive: --fraction must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        m = derive(args.method, args.annotations, args.out, fraction=args.fraction, seed=args.seed,
                   min_gap=args.min_gap, draw=args.draw, min_total=args.min_total, judge_url=args.judge_url,
                   judge_model=args.judge_model, judge_token_env=args.judge_token_env)
    except (ValueError, SchemaError) as exc:
        print(f"bpo-ray derive: {exc}", file=sys.stderr)
        return 2
    c = m.counts
    print(f"derive {args.method}: {c.items_in} items -> {c.paired} with rows, {c.filtered} left out, "
          f"{c.quarantined} quarantined; {c.pairs_written} rows -> {storage.join(args.out, 'pairs')}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
