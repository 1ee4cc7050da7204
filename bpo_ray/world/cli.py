"""``bpo-ray world build``: the bias world, its base model, and the base model's measurements.

    bpo-ray world build --out runs/tiny/world [--seed N] [--models-out DIR] [--set world.base_model.align_steps=400]

Writes the world (images, LLaVA-format splits, prior corpus) to ``--out``, the base models
(``llava``: the MLLM, ``text_lm``: the error injector's LLM) to ``--models-out`` (default:
``<out>/../models``), and ``base_eval.json`` + ``noise_curve.png`` to ``<out>/base_eval/``; then
prints the base model's CHAIR_s, CHAIR_i and POPE F1 on the test split. Every step is cached on its
parameters: a second run with the same ones finishes in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence


def build_parser() -> argparse.ArgumentParser:
    from bpo_ray.config.args import stage_group, stage_parser

    ap, sub = stage_group("world", __doc__)
    build = stage_parser("build", __doc__, out_help="world directory (default: world.out of the config)",
                         out_required=False, subcommands=sub,
                         help="build the world, its base model, and measure it")
    build.add_argument("--seed", type=int, default=None, help="world and recipe seed (default: world.seed)")
    build.add_argument("--models-out", default=None, help="base models' directory (default: <out>/../models)")
    build.add_argument("--no-model", action="store_true", help="build the data only (no base model, no evaluation)")
    build.add_argument("--no-eval", action="store_true", help="skip measuring the base model")
    sub.add_parser("judge", add_help=False,
                   help="serve the world's annotator, an OpenAI-compatible judge upstream on loopback "
                        "(bpo_ray.world.judge_server; --world DIR --port N)")
    return ap


def format_summary(evaluation: dict[str, Any]) -> str:
    """The lines ``world build`` prints: CHAIR on the captions, POPE per split, the noise curve."""
    chair, pope = evaluation["chair"], evaluation["pope"]
    lines = [
        f"base model on the {evaluation['split']} split:",
        f"  CHAIR_s {chair['chair_s']:.3f}  CHAIR_i {chair['chair_i']:.3f}  recall {chair['recall']:.3f}  "
        f"prior-typical share of hallucinations {chair['prior_typical_share']:.3f}  ({chair['n_captions']} captions)",
    ]
    for split, scores in pope.items():
        lines.append(f"  POPE {split:11s} F1 {scores['f1']:.3f}  accuracy {scores['accuracy']:.3f}  "
                     f"yes-ratio {scores['yes_ratio']:.3f}")
    points = evaluation["noise_curve"]["points"]
    lines.append("  noise step -> CHAIR_i / prior-typical rate: " + ", ".join(
        f"{p['noise_step']}: {p['chair_i']:.2f}/{p['prior_typical_rate']:.2f}" for p in points))
    lines.append(f"  curve: {evaluation['noise_curve']['png']}")
    return "\n".join(lines)


def run_build(args: argparse.Namespace) -> int:
    from bpo_ray.config.args import config_from_args
    from bpo_ray.world.base_model import build_base_model
    from bpo_ray.world.build import build_world
    from bpo_ray.world.evaluate_base import evaluate_base_model

    cfg = config_from_args(args)
    w = cfg.world
    out = Path(args.out or w.out).resolve()
    seed = w.seed if args.seed is None else args.seed
    started = time.perf_counter()
    world = build_world(str(out), seed=seed, n_scenes=w.n_scenes, image_size=w.image_size,
                        corpus_lines=w.corpus_lines, train_partner_rate=w.train_partner_rate)
    counts = world["counts"]
    print(f"world: {counts['images']} scenes, records {counts['records']} -> {out} "
          f"({time.perf_counter() - started:.1f}s)", flush=True)
    if args.no_model:
        return 0
    models_out = Path(args.models_out or w.models_out or out.parent / "models").resolve()
    meta = build_base_model(out, models_out, w.base_model, seed=seed, numerics_cfg=cfg.numerics)
    print(f"base model: mllm={meta['paths']['mllm']} text_llm={meta['paths']['text_llm']} "
          f"(weights sha256 {meta['weights_sha256']['mllm'][:16]}, {meta['numerics']['capability']} kernels, "
          f"MKL_CBWR={meta['numerics']['env'].get('MKL_CBWR')}, built on {meta['numerics'].get('cpu', 'an unrecorded CPU')}) "
          f"(recipe {sum(meta['seconds'].values()):.0f}s when built; {time.perf_counter() - started:.1f}s now)",
          flush=True)
    if args.no_eval:
        return 0
    eval_dir = out / "base_eval"
    cached = eval_dir / "base_eval.json"
    evaluation = json.loads(cached.read_text()) if cached.exists() else None
    key = {"base_model": meta["key"], "eval": w.eval.model_dump()}
    if evaluation is None or evaluation.get("key") != key:
        evaluation = evaluate_base_model(out, meta["paths"]["mllm"], eval_dir, split=w.eval.split,
                                         noise_steps=w.eval.noise_steps, seed=seed, batch_size=w.eval.batch_size,
                                         max_new_tokens=w.eval.max_new_tokens, key=key)
    print(format_summary(evaluation))
    print(f"world build done in {time.perf_counter() - started:.1f}s; measurements in {cached}")
    return 0


def main(argv: Sequence[str]) -> int:
    from bpo_ray.config.args import stage_error

    argv = list(argv)
    if argv[:1] == ["judge"]:
        from bpo_ray.world import judge_server

        return judge_server.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run_build(args)
    except (FileNotFoundError, ValueError) as exc:
        return stage_error("world", exc)
