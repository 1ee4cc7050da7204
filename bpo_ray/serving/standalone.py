"""The model app without Ray: one uvicorn process, one in-process transformers backend.

The serving benchmark's baseline (a plain FastAPI server doing the same ``generate``, one request
at a time), and a way to try the API on a laptop without a cluster:

    python -m bpo_ray.serving.standalone --config tiny --port 8100
"""

from __future__ import annotations

import argparse
import sys
from typing import AsyncIterator, Optional, Sequence

from fastapi import FastAPI

from bpo_ray.config import BPOConfig
from bpo_ray.serving.backends.base import GenerationBackend, GenerationResult, TextDelta
from bpo_ray.serving.backends.base import ChatInput
from bpo_ray.serving.chat_input import ChatValidator
from bpo_ray.serving.openai_app import create_openai_app


class LocalClient:
    """``BackendClient`` calling a backend in this process, one request per ``generate``."""

    def __init__(self, backend: GenerationBackend):
        self.backend = backend

    async def generate(self, inp: ChatInput) -> GenerationResult:
        return (await self.backend.generate_batch([inp]))[0]

    async def stream(self, inp: ChatInput) -> AsyncIterator[TextDelta]:
        async for delta in self.backend.stream(inp):
            yield delta


def create_standalone_app(cfg: BPOConfig) -> FastAPI:
    from bpo_ray.models.loading import resolve_model_path
    from bpo_ray.serving.backends import make_backend

    m = cfg.serve.model
    path = resolve_model_path(cfg.models.mllm, cfg.models.cache_dir)
    backend = make_backend("transformers", path, dict(m.adapters), dtype=cfg.models.dtype, device=cfg.models.device,
                           cache_dir=cfg.models.cache_dir)
    validator = ChatValidator.for_model(path, m, m.served_name, list(m.adapters))
    return create_openai_app(validator, LocalClient(backend), prefix=m.route_prefix)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import uvicorn

    from bpo_ray.config.args import add_config_args, config_from_args
    from bpo_ray.serving.apps import with_adapters

    parser = argparse.ArgumentParser(prog="python -m bpo_ray.serving.standalone", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    cfg = with_adapters(config_from_args(args), {})
    uvicorn.run(create_standalone_app(cfg), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
