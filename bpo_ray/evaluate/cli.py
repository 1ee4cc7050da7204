"""``bpo-ray evaluate --config C --model-url URL --model NAME [--judge-url URL] --out DIR_OR_URI``.

Evaluates one served model, then rewrites the report in ``--out`` over every model evaluated into
it so far (run once per model, into the same ``--out``, to compare them).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from bpo_ray.config.args import stage_parser

    parser = stage_parser(
        "evaluate", "Evaluate one served model on the configured benchmarks, then rewrite the report in --out\n"
                    "over every model evaluated into it.",
        out_help="output directory or s3:// URI")
    parser.add_argument("--model-url", required=True, help="OpenAI-compatible base URL of the model app, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="served model name (\"base\" or an adapter name)")
    parser.add_argument("--judge-url", default=None, help="judge proxy base URL, e.g. http://127.0.0.1:8000/judge/v1 "
                        "(token from BPO_JUDGE_TOKEN)")
    parser.add_argument("--baseline", default=None, help="model the report compares against (default: 'base' if present)")
    parser.add_argument("--no-report", action="store_true", help="only write <out>/<model>/ (no report.md)")
    parser.add_argument("--add", action="store_true",
                        help="keep this model's other benchmarks already in --out and replace only the ones "
                             "configured now (add a benchmark to a finished evaluation)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from bpo_ray.config import dump_config
    from bpo_ray.config.args import config_from_args, stage_error
    from bpo_ray.evaluate.pipeline import EvaluateError, collect_results, evaluate
    from bpo_ray.evaluate.report import write_report
    from bpo_ray.evaluate.sources import BenchmarkDataError

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        metrics = evaluate(cfg, args.model_url, args.model, args.judge_url, args.out, add=args.add)
    except (EvaluateError, BenchmarkDataError) as exc:
        return stage_error("evaluate", exc)
    print(json.dumps({"model": args.model, "benchmarks": metrics["benchmarks"], "counts": metrics["counts"]},
                     indent=2, default=str))
    if not args.no_report:
        import yaml

        results = collect_results(args.out)
        written = write_report(results, args.out, config=yaml.safe_load(dump_config(cfg)), baseline=
                               args.baseline if args.baseline in results else None)
        print(f"report: {written['report.md']} ({len(results)} model(s))")
    scored = sum(metrics["counts"][name]["scored"] for name in cfg.evaluate.benchmarks)
    return 0 if scored else 1


if __name__ == "__main__":
    sys.exit(main())
