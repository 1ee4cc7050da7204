"""``bpo-ray generate``: bootstrap preference pairs with Ray Data (also ``jobs/generate.py``).

    bpo-ray generate --config tiny --source runs/tiny/world/train.jsonl --out runs/tiny/pairs
    bpo-ray generate --config llava-1.5-7b --source s3://b/sharegpt4v.json --images s3://b/images \\
        --out s3://b/bpo/pairs --set generate.sampler.noise.steps=[500,900]

Rerunning with the same ``--out`` resumes: finished shards are kept, the rest are generated.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from bpo_ray import storage


def build_parser() -> argparse.ArgumentParser:
    from bpo_ray.config.args import stage_parser

    ap = stage_parser("generate", __doc__, out_help="output dir/URI (default: <storage.root>/generate)",
                      out_required=False)
    ap.add_argument("--source", default=None,
                    help="LLaVA-format .json/.jsonl file, or a dir/prefix of them (local or s3://); "
                         "default: <world.out>/train.jsonl")
    ap.add_argument("--images", default=None,
                    help="root that relative 'image' fields resolve against (default: the source file's folder)")
    ap.add_argument("--restart", action="store_true", help="discard an earlier run under --out instead of resuming")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str]) -> int:
    from bpo_ray.config.args import config_from_args, stage_error
    from bpo_ray.generate.pipeline import run_generate
    from bpo_ray.generate.shards import PlanMismatch
    from bpo_ray.generate.sources import SourceError

    args = build_parser().parse_args(list(argv))
    cfg = config_from_args(args, ["generate.progress=false"] if args.no_progress else [])
    source = args.source or storage.join(cfg.world.out, "train.jsonl")
    out = args.out or storage.join(cfg.storage.root, "generate")
    try:
        manifest = run_generate(cfg, source, out, images=args.images, restart=args.restart)
    except (SourceError, PlanMismatch, ValueError) as exc:
        return stage_error("generate", exc)
    c, t = manifest.counts, manifest.timings
    print(f"generate: {c.items_in} items -> {c.paired} paired, {c.filtered} filtered, {c.quarantined} quarantined; "
          f"{c.pairs_written} pairs {dict(c.by_strategy)}")
    if c.by_reason:
        print("  reasons: " + ", ".join(f"{k}={v}" for k, v in c.by_reason.items()))
    print(f"  {t['items_this_run']:.0f} items this run ({t['shards_resumed']:.0f}/{t['shards']:.0f} shards resumed) "
          f"in {t['total_s']:.1f}s, {t['pairs_per_s']:.2f} pairs/s")
    print(f"  wrote {storage.join(out, 'pairs')}/, {storage.join(out, 'quarantine')}/, {storage.join(out, 'manifest.json')}")
    return 0
