"""vLLM backend: one engine serving the base model and every LoRA adapter (``LoRARequest`` by name).

The engine is built by ``bpo_ray.models.vllm_engine.make_llm`` (CPU/GPU defaults, the start-up
workaround) with ``enable_lora``. One thread owns it and runs ``step()`` whenever requests are in
flight, so concurrent requests share batches (vLLM's continuous batching) and each streams its
tokens back as they are produced (``RequestOutputKind.DELTA``). Requests whose client went away
are aborted in the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import threading
import uuid
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

from PIL import Image

from bpo_ray import storage
from bpo_ray.serving.backends.base import (GenerationResult, IncrementalDecoder, StopTrimmer, TextDelta,
                                           generate_via_stream)
from bpo_ray.serving.backends.base import ChatInput

logger = logging.getLogger("bpo_ray.serving")


def lora_rank(adapter_dir: str) -> int:
    return int(json.loads(Path(adapter_dir, "adapter_config.json").read_text()).get("r", 8))


def model_context_length(model_dir: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return int(getattr(config, "text_config", config).max_position_embeddings)


class VLLMBackend:
    """``GenerationBackend`` on a vLLM engine stepped by a dedicated thread."""

    wants_batching = False  # the engine batches continuously

    def __init__(self, model_path: str, adapters: Optional[dict[str, str]] = None, max_model_len: int = 1024,
                 cache_dir: str = "~/.cache/bpo-ray/models", **engine_kwargs):
        from transformers import AutoTokenizer
        from vllm.lora.request import LoRARequest

        from bpo_ray.models.loading import resolve_model_path
        from bpo_ray.models.vllm_engine import in_process_engine_env, make_llm

        in_process_engine_env()  # the engine lives in this replica, stepped by our thread
        local = {name: storage.localize(uri, cache_dir) for name, uri in (adapters or {}).items()}
        if local:
            ranks = [lora_rank(d) for d in local.values()]
            engine_kwargs.setdefault("enable_lora", True)
            engine_kwargs.setdefault("max_lora_rank", max(8, *ranks))
            engine_kwargs.setdefault("max_loras", len(local))
        path = resolve_model_path(model_path, cache_dir)
        self.llm = make_llm(path, max_model_len=min(max_model_len, model_context_length(path)), **engine_kwargs)
        self.engine = self.llm.llm_engine
        # Text is decoded here, not by vLLM, so both backends return exactly ``tokenizer.decode``.
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(local.items())}
        self._inbox: "queue.Queue[tuple]" = queue.Queue()
        self._outboxes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run_engine, name="vllm-engine-loop", daemon=True)
        self._thread.start()

    def model_names(self) -> list[str]:
        return list(self.loras)

    def close(self) -> None:
        self._stopped.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=10)

    # --- engine thread -------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        box = self._outboxes.get(rid)
        if box is not None:
            box[0].call_soon_threadsafe(box[1].put_nowait, item)

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, rid, prompt, params, lora = msg
            try:
                self.engine.add_request(rid, prompt, params, lora_request=lora)
            except Exception as exc:  # noqa: BLE001 - the request fails, the engine keeps serving
                self._deliver(rid, exc)
        elif msg[0] == "abort":
            self.engine.abort_request([msg[1]])

    def _run_engine(self) -> None:
        while not self._stopped.is_set():
            try:
                # Idle: sleep until a request arrives. Busy: take what arrived, then step.
                idle = not self.engine.has_unfinished_requests()
                self._handle(self._inbox.get() if idle else self._inbox.get_nowait())
                while True:
                    self._handle(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep the loop
                logger.error("vLLM engine step failed: %s", type(exc).__name__, exc_info=exc)
                for rid in list(self._outboxes):
                    self._deliver(rid, RuntimeError("generation failed"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    # --- request side --------------------------------------------------------------------------
    def _sampling_params(self, inp: ChatInput):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = inp.sampling
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                              stop=list(s.stop) or None, output_kind=RequestOutputKind.DELTA,
                              detokenize=bool(s.stop))  # vLLM needs its own text only to find stop strings

    async def stream(self, inp: ChatInput) -> AsyncIterator[TextDelta]:
        rid = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        box: asyncio.Queue = asyncio.Queue()
        self._outboxes[rid] = (loop, box)
        prompt: dict = {"prompt": inp.prompt}
        if inp.image is not None:
            prompt["multi_modal_data"] = {"image": Image.fromarray(inp.image)}
        self._inbox.put(("add", rid, prompt, self._sampling_params(inp), self.loras.get(inp.adapter or "")))
        finished = False
        decoder, trimmer = IncrementalDecoder(self.tokenizer), StopTrimmer(inp.sampling.stop)
        n_tokens, n_prompt = 0, inp.prompt_tokens
        try:
            while not finished:
                out = await box.get()
                if isinstance(out, BaseException):
                    raise out
                piece = out.outputs[0]
                n_tokens += len(piece.token_ids)
                if out.prompt_token_ids is not None:
                    n_prompt = len(out.prompt_token_ids)
                text = trimmer.push(decoder.push(list(piece.token_ids)))
                finished = out.finished
                if finished:
                    text += trimmer.push(decoder.finish()) + trimmer.flush()
                    reason = "stop" if trimmer.stopped or piece.finish_reason != "length" else "length"
                    yield TextDelta(text, reason, n_tokens, n_prompt)
                elif text:
                    yield TextDelta(text, None, n_tokens, n_prompt)
        finally:
            self._outboxes.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))

    async def generate_batch(self, inputs: Sequence[ChatInput]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(generate_via_stream(self, i) for i in inputs)))
