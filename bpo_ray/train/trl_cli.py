"""``bpo-ray trl-pairs --config C --pairs P --out DIR``: pairs as a dataset stock TRL trains on.

Writes ``DIR`` with ``datasets.Dataset.save_to_disk`` (``datasets.load_from_disk(DIR)`` reads it)
and ``DIR/trl_pairs.json``: the row account (in = converted + dropped, with reasons and ids) and
the ``DPOConfig`` settings equal to the config's ``train`` section. See ``bpo_ray.train.trl_format``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from bpo_ray.config.args import config_from_args, stage_error, stage_parser


def build_parser() -> argparse.ArgumentParser:
    return stage_parser("trl-pairs", __doc__,
                        pairs_help="a generate/reference output dir, a pairs dir or a Parquet file",
                        out_help="local output directory for the TRL dataset")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    from transformers import AutoTokenizer

    from bpo_ray.models.ensure import ensure_models
    from bpo_ray.models.loading import resolve_model_path
    from bpo_ray.train.data import PairsError
    from bpo_ray.train.trl_format import to_trl_dataset, trl_dpo_settings

    if "://" in args.out:
        return stage_error("trl-pairs", "--out must be a local directory (datasets.save_to_disk)")
    try:
        models = ensure_models(cfg.models, ["mllm"], cfg.name, "trl-pairs")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(models.mllm, models.cache_dir))
        result = to_trl_dataset(args.pairs, tokenizer)
    except (PairsError, FileNotFoundError) as exc:
        return stage_error("trl-pairs", exc)
    try:
        settings = trl_dpo_settings(cfg.train)
    except ValueError as exc:
        settings = {"unavailable": str(exc)}
    out = Path(args.out)
    result.dataset.save_to_disk(str(out))
    (out / "trl_pairs.json").write_text(json.dumps({
        "pairs": args.pairs, "model": models.mllm, "rows_in": result.rows_in, "converted": result.converted,
        "dropped": result.dropped, "dropped_ids": result.dropped_ids, "dpo_config": settings}, indent=2))
    print(f"bpo-ray trl-pairs: {result.converted} of {result.rows_in} pairs -> {out} "
          f"(dropped: {result.dropped or 'none'}); DPOConfig settings in {out / 'trl_pairs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
