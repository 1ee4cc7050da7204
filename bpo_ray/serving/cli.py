"""``bpo-ray serve``: the model app (``/v1``) and the judge proxy (``/judge/v1``) on Ray Serve.

    bpo-ray serve --config tiny --adapter bpo=runs/tiny/train/adapter
    bpo-ray serve --config llava-1.5-7b --adapter bpo=s3://bucket/bpo-ray/train/adapter --detach

Blocks until Ctrl-C (then deletes its apps) unless ``--detach``, which leaves them running on
the cluster, as ``serve deploy`` does.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from bpo_ray.config.args import config_from_args, stage_error, stage_parser


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"--adapter {text!r} must look like NAME=DIR_OR_URI")
    return name, uri


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("serve", __doc__)
    parser.add_argument("--adapter", action="append", type=parse_adapter, default=[], metavar="NAME=DIR_OR_URI",
                        help="serve a LoRA adapter under this model name (repeatable)")
    parser.add_argument("--app", choices=["both", "model", "judge"], default="both", help="which apps to run")
    parser.add_argument("--host", help="override serve.host")
    parser.add_argument("--port", type=int, help="override serve.port")
    parser.add_argument("--detach", action="store_true", help="deploy and exit; the apps keep running")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    extra = [f"serve.host={args.host}"] if args.host else []
    extra += [f"serve.port={args.port}"] if args.port else []
    cfg = config_from_args(args, extra)

    from bpo_ray.config import ConfigError
    from bpo_ray.models.ensure import ensure_models
    from bpo_ray.models.loading import resolve_model_path
    from bpo_ray.raycluster import init_ray, ray_address_choice
    from bpo_ray.serving.apps import with_adapters
    from bpo_ray.serving.deploy import JUDGE_APP, MODEL_APP, start_serving, stop_serving
    from bpo_ray.serving.ingress import prepare_ingress

    try:
        cfg = with_adapters(cfg, dict(args.adapter))
    except (ConfigError, ValueError) as exc:
        return stage_error("serve", exc)
    apps = (MODEL_APP, JUDGE_APP) if args.app == "both" else (args.app,)
    if MODEL_APP in apps and "://" not in cfg.models.mllm:  # remote models are fetched by the replicas
        try:
            ensure_models(cfg.models, ["mllm"], cfg.name, "serve")
            resolve_model_path(cfg.models.mllm, cfg.models.cache_dir)
        except FileNotFoundError as exc:
            return stage_error("serve", exc)
    note = prepare_ingress(cfg.serve.ingress, joins_cluster=ray_address_choice(cfg.ray)[0] is not None)
    if note:
        print(f"bpo-ray serve: {note}", file=sys.stderr)
    init_ray(cfg.ray)
    urls = start_serving(cfg, apps)
    if urls.model:
        names = ", ".join([cfg.serve.model.served_name, *cfg.serve.model.adapters])
        print(f"model app:   {urls.model}/chat/completions  (models: {names}; backend {cfg.serve.model.backend})")
    if urls.judge:
        print(f"judge proxy: {urls.judge}/chat/completions  (upstream {cfg.serve.judge.upstream_base_url}; "
              f"client tokens from ${cfg.serve.judge.client_tokens_env})")
    sys.stdout.flush()
    if args.detach:
        return 0
    print("serving; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        stop_serving(apps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
