"""``bpo-ray reference --config C --pairs P --out O [--set ...]`` (also ``jobs/reference.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from bpo_ray.config.args import config_from_args, stage_error, stage_parser


def build_parser() -> argparse.ArgumentParser:
    return stage_parser(
        "reference", "Add reference log-probs (base model, the same answer-token scoring as training) to every "
        "pair; `bpo-ray train --pairs O` then skips the reference forward pass.",
        pairs_help="input pairs: a generate output dir, a pairs dir or a Parquet file",
        out_help="output dir (local or s3://): pairs/*.parquet + manifest.json")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    from bpo_ray.numerics import NumericsError
    from bpo_ray.train.data import PairsError
    from bpo_ray.train.reference import run_reference

    try:
        manifest = run_reference(cfg, args.pairs, args.out)
    except (PairsError, FileNotFoundError, NumericsError) as exc:
        return stage_error("reference", exc)
    c = manifest.counts
    print(f"bpo-ray reference: {c.paired} of {c.items_in} pairs scored ({c.filtered} prompts too long) "
          f"in {manifest.timings['wall_s']:.1f} s; pairs at {args.out}/pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
