"""``bpo-ray models tiny --out DIR [--seed N]``: build the tiny LLaVA and text LM offline."""

from __future__ import annotations

import argparse
import time
from typing import Sequence

from bpo_ray.models.tiny import TinySpec, build_tiny_models


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="bpo-ray models")
    sub = ap.add_subparsers(dest="what", required=True)
    tiny = sub.add_parser("tiny", help="random-init tiny LLaVA + text LM with a locally trained tokenizer")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--image-size", type=int, default=TinySpec.image_size)
    args = ap.parse_args(list(argv))
    t0 = time.time()
    paths = build_tiny_models(args.out, seed=args.seed, spec=TinySpec(image_size=args.image_size))
    print(f"tiny models written in {time.time() - t0:.1f}s: mllm={paths['mllm']} text_llm={paths['text_llm']}")
    return 0
