"""The model app's HTTP surface: OpenAI-compatible ``/chat/completions`` and ``/models``.

``create_openai_app`` is independent of Ray: the Serve ingress wraps it around a deployment
handle, and the standalone server (the benchmark's baseline) around an in-process backend, so
both speak byte-for-byte the same API.
"""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Protocol

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from bpo_ray.serving.backends.base import GenerationResult, TextDelta
from bpo_ray.serving.backends.base import ChatInput
from bpo_ray.serving.chat_input import ChatValidator
from bpo_ray.serving.errors import APIError, error_body, error_response, install_error_handlers
from bpo_ray.serving.protocol import (SSE_DONE, ChatCompletionRequest, chunk, completion_id, completion_response,
                                      models_list, sse_error, usage_dict)

logger = logging.getLogger("bpo_ray.serving")


class BackendClient(Protocol):
    """How the HTTP layer reaches a backend (a Serve handle or an in-process backend)."""

    async def generate(self, inp: ChatInput) -> GenerationResult: ...

    def stream(self, inp: ChatInput) -> AsyncIterator[TextDelta]: ...


class BodySizeLimit:
    """ASGI middleware: refuse bodies whose Content-Length is over the limit before reading them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                resp = error_response(APIError(413, f"request body is over {self.max_bytes} bytes",
                                               code="request_too_large"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def max_request_bytes(max_image_bytes: int) -> int:
    """Room for one base64 image (4/3 of its bytes) plus a generous conversation."""
    return max_image_bytes * 4 // 3 + 1024 * 1024


def create_openai_app(validator: ChatValidator, client: BackendClient, prefix: str = "",
                      body_limit: int | None = None) -> FastAPI:
    """FastAPI app serving ``{prefix}/chat/completions`` and ``{prefix}/models``."""
    app = FastAPI(title="bpo-ray model", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=body_limit or max_request_bytes(validator.limits.max_image_bytes))

    @app.get(prefix + "/models")
    async def list_models() -> dict:
        return models_list(validator.model_names)

    @app.post(prefix + "/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        inp = await validator.parse(req)
        cid = completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(client, inp, cid, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        res = await client.generate(inp)
        return completion_response(cid, inp.model, res.text, res.finish_reason, res.prompt_tokens,
                                   res.completion_tokens)

    return app


async def _sse(client: BackendClient, inp: ChatInput, cid: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    created = int(time.time())
    yield chunk(cid, inp.model, created, {"role": "assistant", "content": ""})
    last = TextDelta("", "stop", 0, inp.prompt_tokens)
    try:
        async for delta in client.stream(inp):
            if delta.text:
                yield chunk(cid, inp.model, created, {"content": delta.text})
            last = delta
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band and end the stream
        logger.error("streaming generation failed: %s", type(exc).__name__, exc_info=exc)
        yield sse_error(error_body(500, "generation failed"))
        yield SSE_DONE
        return
    yield chunk(cid, inp.model, created, {}, finish_reason=last.finish_reason or "stop")
    if include_usage:
        yield chunk(cid, inp.model, created, {}, usage=usage_dict(last.prompt_tokens or inp.prompt_tokens,
                                                                  last.completion_tokens), with_choice=False)
    yield SSE_DONE
