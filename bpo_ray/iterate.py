"""``bpo-ray iterate``: rounds of on-policy generate -> train (RLAIF-V's iterative feedback).

RLAIF-V (Yu et al., CVPR 2025, section 3.3) trains in rounds: each round samples fresh answers
from the *current* policy, labels them, runs DPO with that policy as the reference, and the result
is the next round's policy. Here a round ``r`` is::

    OUT/round-r/generate/   on_policy pairs sampled from policy_r   (policy_0 = models.mllm)
    OUT/round-r/train/      LoRA DPO on them; the reference is policy_r (the adapter disabled)
    OUT/round-r/policy/     policy_{r+1} = policy_r + adapter, merged (a full checkpoint)

so each round's reference model is the previous round's policy, as in RLAIF-V, without the trainer
knowing about rounds. ``OUT/round-r/<stage>.done.json`` marks a finished stage; rerunning the same
command skips finished stages and resumes the rest (generate resumes by shard, train from its
latest checkpoint), so a killed run finishes without redoing work. ``OUT/iterate.json`` lists
the rounds and the final policy. Every stage runs in this process (``ray job submit -- python
-m bpo_ray iterate ...`` runs it on a cluster).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Optional, Sequence

from bpo_ray import storage

STAGES = ("generate", "train", "policy")


def marker_uri(out: str, round_: int, stage: str) -> str:
    return storage.join(out, f"round-{round_}", f"{stage}.done.json")


def read_marker(out: str, round_: int, stage: str) -> Optional[dict[str, Any]]:
    uri = marker_uri(out, round_, stage)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def write_marker(out: str, round_: int, stage: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write the stage's marker last (after its outputs); returns what a resumed run will read."""
    info = {**info, "finished_at": time.time()}
    storage.write_text(marker_uri(out, round_, stage), json.dumps(info, indent=2))
    return info


def run_iterate(cfg, source: str, out: str, rounds: int, images: Optional[str] = None,
                log=print) -> dict[str, Any]:
    """Run (or resume) ``rounds`` rounds; returns the summary written to ``OUT/iterate.json``."""
    from bpo_ray.generate.pipeline import run_generate
    from bpo_ray.train.export import export_merged
    from bpo_ray.train.trainer import run_training

    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if "on_policy" not in cfg.generate.strategies or len(cfg.generate.strategies) != 1:
        raise ValueError("iterate samples from the current policy: set generate.strategies=[on_policy]")
    if cfg.generate.on_policy.adapter:
        raise ValueError("iterate starts from models.mllm; merge a starting adapter into it first "
                         "(generate.on_policy.adapter must be unset)")
    policy = cfg.models.mllm
    summary: dict[str, Any] = {"source": source, "rounds": []}
    for r in range(rounds):
        rdir = storage.join(out, f"round-{r}")
        rcfg = cfg.model_copy(deep=True)
        rcfg.models.mllm = policy
        info: dict[str, Any] = {"round": r, "policy": policy}
        done = read_marker(out, r, "generate")
        if done is None:
            log(f"[iterate] round {r}: generate from {policy}")
            m = run_generate(rcfg, source, storage.join(rdir, "generate"), images=images)
            done = {"pairs": m.counts.pairs_written, "paired": m.counts.paired, "items_in": m.counts.items_in}
            done = write_marker(out, r, "generate", done)
        info["generate"] = done
        done = read_marker(out, r, "train")
        if done is None:
            log(f"[iterate] round {r}: train on {done_pairs(info)} pairs")
            res = run_training(rcfg, storage.join(rdir, "generate"), storage.join(rdir, "train"))
            done = {"adapter": res.adapter, "steps": res.steps, "loss": res.final_metrics.get("loss")}
            done = write_marker(out, r, "train", done)
        info["train"] = done
        done = read_marker(out, r, "policy")
        if done is None:
            log(f"[iterate] round {r}: merge the adapter into the next policy")
            merged = export_merged(policy, info["train"]["adapter"], storage.join(rdir, "policy"),
                                   dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
            done = {"policy": merged}
            done = write_marker(out, r, "policy", done)
        info["next_policy"] = policy = done["policy"]
        summary["rounds"].append(info)
    summary["final_policy"] = policy
    storage.write_text(storage.join(out, "iterate.json"), json.dumps(summary, indent=2))
    return summary


def done_pairs(info: dict[str, Any]) -> int:
    return int(info["generate"]["pairs"])


def build_parser() -> argparse.ArgumentParser:
    from bpo_ray.config.args import stage_parser

    ap = stage_parser("iterate", __doc__.splitlines()[0], out_help="output dir/URI: round-N/{generate,train,policy}/")
    ap.add_argument("--source", default=None, help="LLaVA-format source (default: <world.out>/train.jsonl)")
    ap.add_argument("--images", default=None, help="root that relative 'image' fields resolve against")
    ap.add_argument("--rounds", type=int, default=2)
    return ap


def main(argv: Sequence[str]) -> int:
    from bpo_ray.config.args import config_from_args, stage_error

    args = build_parser().parse_args(list(argv))
    cfg = config_from_args(args, ["generate.progress=false"])
    source = args.source or storage.join(cfg.world.out, "train.jsonl")
    try:
        summary = run_iterate(cfg, source, args.out, args.rounds, images=args.images)
    except ValueError as exc:
        return stage_error("iterate", exc)
    for info in summary["rounds"]:
        print(f"round {info['round']}: {info['generate']['pairs']} pairs, {info['train']['steps']} steps, "
              f"policy -> {info['next_policy']}")
    print(f"final policy: {summary['final_policy']}")
    return 0
