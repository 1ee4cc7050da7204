"""Fail loudly when the environment is broken (``python -m bpo_ray.envcheck``).

Checks: torch is the +cpu build on a machine without CUDA (a CUDA build here means pip pulled
GBs of the wrong wheels), vLLM imports its LLaVA model, ray/deepspeed/peft import.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def check(quick: bool = False) -> list[str]:
    problems: list[str] = []
    try:
        import torch

        if not torch.cuda.is_available() and "+cpu" not in torch.__version__:
            problems.append(f"torch {torch.__version__} is not the +cpu build on a machine without CUDA")
    except Exception as exc:  # noqa: BLE001 - report whatever breaks the import
        problems.append(f"torch does not import: {exc}")
    for mod in ("ray", "ray.data", "ray.train", "ray.serve", "deepspeed", "peft", "transformers", "pyarrow", "boto3"):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{mod} does not import: {exc}")
    if not quick:
        try:
            importlib.import_module("torchvision")
            importlib.import_module("vllm.model_executor.models.llava")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"vLLM cannot import its LLaVA model: {exc!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="skip the slow vLLM import")
    args = ap.parse_args(argv)
    problems = check(quick=args.quick)
    for p in problems:
        print(f"envcheck: BROKEN: {p}", file=sys.stderr)
    if not problems:
        print("envcheck: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
