"""Transformers backend: a LLaVA model with any number of PEFT LoRA adapters, addressable by name.

Adapters are loaded once into one ``PeftModel`` (``load_adapter`` per name); a request picks its
adapter with ``set_adapter`` or runs the base model under ``disable_adapter()``, so no second
copy of the base weights is held. Requests of the same adapter and sampling settings are
generated together in one left-padded batch. A lock serialises model use: the active adapter is
model state.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from itertools import groupby
from typing import AsyncIterator, Iterator, Optional, Sequence

import torch
from PIL import Image

from bpo_ray import storage
from bpo_ray.models.loading import load_mllm
from bpo_ray.serving.backends.base import (GenerationResult, IncrementalDecoder, StopTrimmer, TextDelta,
                                           trim_at_stop)
from bpo_ray.serving.backends.base import ChatInput, SamplingSpec


class _TokenQueueStreamer:
    """A ``generate`` streamer that forwards each new token id to an asyncio queue.

    ``generate`` first ``put``s the prompt ids; those are skipped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _StopWhenSet:
    """Stopping criterion that ends generation once the client has gone or a stop string hit."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _group_key(inp: ChatInput) -> tuple:
    s = inp.sampling
    return (inp.adapter or "", inp.image is not None, s.temperature, s.top_p, s.seed if s.temperature > 0 else None)


class TransformersBackend:
    """``GenerationBackend`` on Hugging Face transformers + peft."""

    wants_batching = True

    def __init__(self, model_path: str, adapters: Optional[dict[str, str]] = None, dtype: str = "float32",
                 device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models"):
        model, self.processor = load_mllm(model_path, dtype=dtype, device=device, cache_dir=cache_dir)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.adapter_names = list(adapters or {})
        if adapters:
            from peft import PeftModel

            (first, first_uri), *rest = adapters.items()
            model = PeftModel.from_pretrained(model, storage.localize(first_uri, cache_dir), adapter_name=first)
            for name, uri in rest:
                model.load_adapter(storage.localize(uri, cache_dir), adapter_name=name)
            model.eval()
        self.model = model
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self._lock = threading.Lock()

    def model_names(self) -> list[str]:
        return list(self.adapter_names)

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def _adapter(self, name: Optional[str]) -> Iterator[None]:
        if not self.adapter_names:
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def _encode(self, inputs: Sequence[ChatInput]) -> dict:
        images = [Image.fromarray(i.image) for i in inputs if i.image is not None]
        enc = self.processor(images=images or None, text=[i.prompt for i in inputs], return_tensors="pt",
                             padding=True)
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def _generate_kwargs(self, s: SamplingSpec, max_new_tokens: int) -> dict:
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
            if s.seed is not None:
                torch.manual_seed(s.seed)
        else:
            kw.update(do_sample=False)
        return kw

    def _finish(self, ids: list[int], s: SamplingSpec) -> tuple[str, str, int]:
        """(text, finish_reason, completion_tokens) from generated ids."""
        ids = ids[: s.max_tokens]
        if self.eos_id in ids:
            cut = ids.index(self.eos_id)
            text, reason, n = self.tokenizer.decode(ids[:cut], skip_special_tokens=True), "stop", cut + 1
        else:
            text, reason, n = self.tokenizer.decode(ids, skip_special_tokens=True), "length", len(ids)
        text, hit = trim_at_stop(text, s.stop)
        return text, ("stop" if hit else reason), n

    @torch.no_grad()
    def _generate_group(self, group: Sequence[ChatInput]) -> list[GenerationResult]:
        enc = self._encode(group)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        width = enc["input_ids"].shape[1]
        with self._adapter(group[0].adapter):
            out = self.model.generate(**enc, **self._generate_kwargs(group[0].sampling,
                                                                   max(i.sampling.max_tokens for i in group)))
        results = []
        for row, inp, n_prompt in zip(out[:, width:].tolist(), group, prompt_lens):
            text, reason, n = self._finish(row, inp.sampling)
            results.append(GenerationResult(text, reason, int(n_prompt), n))
        return results

    def generate_batch_sync(self, inputs: Sequence[ChatInput]) -> list[GenerationResult]:
        """Generate for every input; inputs sharing adapter and sampling settings run as one batch."""
        order = sorted(range(len(inputs)), key=lambda i: repr(_group_key(inputs[i])))
        results: list[Optional[GenerationResult]] = [None] * len(inputs)
        with self._lock:
            for _, idx in groupby(order, key=lambda i: repr(_group_key(inputs[i]))):
                idx = list(idx)
                for i, res in zip(idx, self._generate_group([inputs[i] for i in idx])):
                    results[i] = res
        return results  # type: ignore[return-value]

    async def generate_batch(self, inputs: Sequence[ChatInput]) -> list[GenerationResult]:
        return await asyncio.to_thread(self.generate_batch_sync, list(inputs))

    def _stream_thread(self, inp: ChatInput, streamer: _TokenQueueStreamer, stop: threading.Event) -> None:
        from transformers import StoppingCriteriaList

        try:
            with self._lock, torch.no_grad():
                enc = self._encode([inp])
                streamer.loop.call_soon_threadsafe(streamer.queue.put_nowait, ("prompt", int(enc["input_ids"].shape[1])))
                with self._adapter(inp.adapter):
                    self.model.generate(**enc, **self._generate_kwargs(inp.sampling, inp.sampling.max_tokens),
                                        streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            streamer.loop.call_soon_threadsafe(streamer.queue.put_nowait, exc)
        finally:
            streamer.loop.call_soon_threadsafe(streamer.queue.put_nowait, None)

    async def stream(self, inp: ChatInput) -> AsyncIterator[TextDelta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        worker = loop.run_in_executor(None, self._stream_thread, inp, _TokenQueueStreamer(loop, queue), stop)
        decoder = IncrementalDecoder(self.tokenizer)
        n_prompt, finish, n_generated = inp.prompt_tokens, None, 0
        trimmer = StopTrimmer(inp.sampling.stop)
        try:
            while finish is None:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):
                    n_prompt = item[1]
                    continue
                if self.eos_id in item:
                    item, finish = item[:item.index(self.eos_id)], "stop"
                    n_generated += 1
                n_generated += len(item)
                piece = trimmer.push(decoder.push(item))
                if trimmer.stopped:
                    finish = "stop"
                if piece:
                    yield TextDelta(piece, None, n_generated, n_prompt)
            tail = trimmer.push(decoder.finish()) + trimmer.flush()
            if trimmer.stopped:
                finish = "stop"
            yield TextDelta(tail, finish or "length", n_generated, n_prompt)
        finally:
            stop.set()
            with contextlib.suppress(BaseException):
                await worker
