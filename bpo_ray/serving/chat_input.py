"""Turn an OpenAI chat request into one validated generation input for a LLaVA backend.

Everything a client can get wrong is checked here, before any model work, and answered with a
400/404 naming the problem: unknown model, bad image URL or base64, an image over the size
limit, more than one image, too many tokens. The prompt is LLaVA-1.5's conversation format
(``bpo_ray.models.prompts.build_prompt``), identical to what the generate and train stages use.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from bpo_ray import images as image_io
from bpo_ray.models.prompts import build_prompt, strip_image_token
from bpo_ray.models.steerlm import steer_prompt
from bpo_ray.serving.backends.base import ChatInput, SamplingSpec
from bpo_ray.serving.errors import APIError
from bpo_ray.serving.protocol import ChatCompletionRequest, ChatMessage

MAX_STOP_SEQUENCES = 4
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class Conversation:
    question: str
    history: tuple[tuple[str, str], ...]
    image_urls: tuple[str, ...]


def _text_and_images(msg: ChatMessage, index: int) -> tuple[str, list[str]]:
    if msg.content is None:
        return "", []
    if isinstance(msg.content, str):
        return msg.content, []
    texts, urls = [], []
    for part in msg.content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.image_url is None:
            raise APIError(400, f"messages[{index}]: image_url part without an image_url", code="invalid_content")
        else:
            urls.append(part.image_url.url)
    return "\n".join(texts), urls


def conversation_from_messages(messages: Sequence[ChatMessage]) -> Conversation:
    """Fold OpenAI messages into LLaVA turns: system text prefixes the first question, consecutive
    user messages are joined, each assistant message closes a turn; the last message is the user's."""
    system: list[str] = []
    history: list[tuple[str, str]] = []
    pending: list[str] = []
    urls: list[str] = []
    for i, msg in enumerate(messages):
        text, part_urls = _text_and_images(msg, i)
        if part_urls and msg.role != "user":
            raise APIError(400, f"messages[{i}]: only user messages may carry images", code="invalid_content")
        urls.extend(part_urls)
        if msg.role in ("system", "developer"):
            system.append(strip_image_token(text))
        elif msg.role == "user":
            pending.append(strip_image_token(text))
        else:
            if not pending:
                raise APIError(400, f"messages[{i}]: assistant message without a user message before it",
                               code="invalid_messages")
            history.append(("\n".join(pending), strip_image_token(text)))
            pending = []
    if not pending:
        raise APIError(400, "the last message must be from the user", code="invalid_messages")
    if len(urls) > 1:
        raise APIError(400, f"{len(urls)} images given; this model takes at most one per conversation",
                       code="too_many_images")
    turns = history + [("\n".join(pending), "")]
    if system:
        q0, a0 = turns[0]
        turns[0] = ("\n".join(system + [q0]), a0)
    return Conversation(question=turns[-1][0], history=tuple(turns[:-1]), image_urls=tuple(urls))


def llava_prompt(conv: Conversation, with_image: bool) -> str:
    """LLaVA-1.5 prompt; without an image the ``<image>`` placeholder line is left out."""
    return build_prompt(conv.question, conv.history, with_image=with_image)


@dataclass(frozen=True)
class ModelLimits:
    max_tokens: int
    max_prompt_tokens: int
    context_length: int
    image_seq_length: int
    max_image_bytes: int
    allow_remote_images: bool
    remote_image_timeout_s: float = 10.0


class ChatValidator:
    """Validates requests for one served model family (the base model and its adapters)."""

    def __init__(self, tokenizer, limits: ModelLimits, served_name: str, adapter_names: Sequence[str]):
        self.tokenizer = tokenizer
        self.limits = limits
        self.served_name = served_name
        self.adapter_names = tuple(adapter_names)

    @classmethod
    def for_model(cls, model_path: str, limits_cfg, served_name: str, adapter_names: Sequence[str]) -> "ChatValidator":
        """``limits_cfg`` is a ``ModelAppConfig``; context and image sizes come from the checkpoint."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(model_path)
        text_cfg = getattr(config, "text_config", config)
        limits = ModelLimits(
            max_tokens=limits_cfg.max_tokens, max_prompt_tokens=limits_cfg.max_prompt_tokens,
            context_length=int(text_cfg.max_position_embeddings),
            image_seq_length=int(getattr(config, "image_seq_length", 576)),
            max_image_bytes=limits_cfg.max_image_bytes, allow_remote_images=limits_cfg.allow_remote_images,
            remote_image_timeout_s=limits_cfg.remote_image_timeout_s,
        )
        return cls(AutoTokenizer.from_pretrained(model_path), limits, served_name, adapter_names)

    @property
    def model_names(self) -> list[str]:
        return [self.served_name, *self.adapter_names]

    def resolve_model(self, name: Optional[str]) -> Optional[str]:
        """Adapter name for ``name`` (None = base model); 404 for names this app does not serve."""
        if name is None or name == self.served_name:
            return None
        if name in self.adapter_names:
            return name
        raise APIError(404, f"model {name!r} does not exist; available: {', '.join(self.model_names)}",
                       code="model_not_found", param="model")

    def count_prompt_tokens(self, prompt: str, with_image: bool) -> int:
        n = len(self.tokenizer(prompt)["input_ids"])
        return n + (self.limits.image_seq_length - 1 if with_image else 0)

    def sampling(self, req: ChatCompletionRequest) -> SamplingSpec:
        max_tokens = req.max_completion_tokens or req.max_tokens or self.limits.max_tokens
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {self.limits.max_tokens}",
                           code="max_tokens_too_large", param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
            raise APIError(400, f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings", code="invalid_stop",
                           param="stop")
        return SamplingSpec(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            seed=req.seed, stop=stop)

    async def load_image(self, url: str) -> np.ndarray:
        """Decode a data URL (or, where allowed, fetch an http(s)/s3 URL) into RGB pixels."""
        lim = self.limits
        try:
            if url.startswith("data:"):  # decoding a large image takes a while: off the event loop
                img = await asyncio.to_thread(image_io.decode_data_url, url, lim.max_image_bytes)
            elif lim.allow_remote_images and url.startswith(("http://", "https://")):
                img = image_io.decode_image(await fetch_http_image(url, lim.max_image_bytes, lim.remote_image_timeout_s),
                                            max_bytes=lim.max_image_bytes)
            elif lim.allow_remote_images and url.startswith("s3://"):
                img, _ = await asyncio.to_thread(image_io.load_image, url, lim.max_image_bytes)
            else:
                allowed = "data: URLs, http(s):// and s3://" if lim.allow_remote_images else "base64 data: URLs"
                raise APIError(400, f"image_url must be one of: {allowed}", code="bad_image_url", param="image_url")
        except image_io.ImageError as exc:
            raise APIError(400, f"image rejected: {exc}", code=exc.reason, param="image_url") from None
        return np.asarray(img, dtype=np.uint8)

    async def parse(self, req: ChatCompletionRequest) -> ChatInput:
        adapter = self.resolve_model(req.model)
        sampling = self.sampling(req)
        conv = conversation_from_messages(req.messages)
        image = await self.load_image(conv.image_urls[0]) if conv.image_urls else None
        prompt = llava_prompt(conv, with_image=image is not None)
        if req.steer_attributes is not None:
            try:
                prompt = steer_prompt(prompt, req.steer_attributes)
            except ValueError as exc:
                raise APIError(400, str(exc), code="bad_steer_attributes", param="steer_attributes") from None
        lim = self.limits
        if len(prompt) > MAX_CHARS_PER_TOKEN * lim.max_prompt_tokens:  # refuse before tokenizing megabytes
            raise APIError(400, f"prompt is {len(prompt)} characters, far over the {lim.max_prompt_tokens}-token limit",
                           code="context_length_exceeded", param="messages")
        n_prompt = self.count_prompt_tokens(prompt, image is not None)
        if n_prompt > lim.max_prompt_tokens:
            raise APIError(400, f"prompt is {n_prompt} tokens (image included); the limit is {lim.max_prompt_tokens}",
                           code="context_length_exceeded", param="messages")
        if n_prompt + sampling.max_tokens > lim.context_length:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                           f"model's context of {lim.context_length} tokens", code="context_length_exceeded",
                           param="max_tokens")
        return ChatInput(model=req.model or self.served_name, adapter=adapter, prompt=prompt, image=image,
                         sampling=sampling, prompt_tokens=n_prompt)


async def fetch_http_image(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET an image, refusing bodies over ``max_bytes`` without reading them whole."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise image_io.ImageError("missing_image", f"HTTP {resp.status_code}")
                data = bytearray()
                async for piece in resp.aiter_bytes():
                    data += piece
                    if len(data) > max_bytes:
                        raise image_io.ImageError("image_too_large", f"more than {max_bytes} bytes")
                return bytes(data)
    except httpx.HTTPError as exc:
        raise image_io.ImageError("missing_image", type(exc).__name__) from None
