"""``bpo-ray train --config C --pairs P --out O [--set key=value ...]`` (also ``jobs/train.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from bpo_ray.config.args import config_from_args, stage_error, stage_parser


def build_parser() -> argparse.ArgumentParser:
    return stage_parser(
        "train", "LoRA DPO (or SFT, --set train.mode=sft) on preference pairs with Ray Train + DeepSpeed ZeRO. "
        "Running it again with the same --out resumes from the latest checkpoint.",
        pairs_help="pairs: a generate/reference output dir, a pairs dir or a Parquet file (local or s3://)",
        out_help="output dir (local or s3://): adapter/, checkpoints/, metrics.jsonl, logps.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    from bpo_ray.numerics import NumericsError
    from bpo_ray.train.data import PairsError
    from bpo_ray.train.local_launch import LauncherError
    from bpo_ray.train.lora import TargetModuleError
    from bpo_ray.train.trainer import run_training
    from bpo_ray.train.zero import ZeroConfigError

    try:
        result = run_training(cfg, args.pairs, args.out)
    except (PairsError, TargetModuleError, ZeroConfigError, FileNotFoundError, LauncherError, NumericsError) as exc:
        return stage_error("train", exc)
    m = result.final_metrics
    summary = f"loss {m.get('loss', float('nan')):.4f}"
    if cfg.train.mode == "dpo":
        summary += f", reward accuracy {m.get('reward_accuracy', float('nan')):.2f}, reference {result.reference}"
    print(f"bpo-ray train: {result.steps} steps ({summary}) in {result.wall_s:.1f} s; adapter at {result.adapter}")
    v = result.validation
    if v:
        value = v["adapter_metric_value"]
        print(f"bpo-ray train: adapter = {v['adapter']} validated step {v['adapter_step']} ({v['metric']} "
              f"{'n/a' if value is None else f'{value:.4f}'} on {v['held_out_pairs']} held-out pairs)")
        if v["collapse_steps"]:
            stopped = f"; stopped at step {v['stopped_at_step']}" if v["stopped_at_step"] else ""
            print(f"bpo-ray train: WARNING collapse: the held-out chosen log-prob fell past "
                  f"train.validation.chosen_drop_warn at steps {v['collapse_steps']}{stopped} (metrics.jsonl: val_collapse)",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
