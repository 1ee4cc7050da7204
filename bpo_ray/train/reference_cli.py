"""``bpo-ray reference --config C --pairs P --out O [--set ...]`` (also ``jobs/reference.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from bpo_ray.config.args import add_config_args, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpo-ray reference", description=(
        "Add reference log-probs (base model, the same answer-token scoring as training) to every pair; "
        "`bpo-ray train --pairs O` then skips the reference forward pass."))
    add_config_args(parser)
    parser.add_argument("--pairs", required=True, help="input pairs: a generate output dir, a pairs dir or a Parquet file")
    parser.add_argument("--out", required=True, help="output dir (local or s3://): pairs/*.parquet + manifest.json")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    from bpo_ray.train.data import PairsError
    from bpo_ray.train.reference import run_reference

    try:
        manifest = run_reference(cfg, args.pairs, args.out)
    except (PairsError, FileNotFoundError) as exc:
        print(f"bpo-ray reference: {exc}", file=sys.stderr)
        return 2
    c = manifest.counts
    print(f"bpo-ray reference: {c.paired} of {c.items_in} pairs scored ({c.filtered} prompts too long) "
          f"in {manifest.timings['wall_s']:.1f} s; pairs at {args.out}/pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
