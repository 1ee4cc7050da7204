"""The Ray Data job: benchmark rows -> model endpoint -> (judge) -> answered rows.

One streaming stage: a small pool of I/O-bound actors (a fraction of a CPU each), each running a
thread pool through the official ``openai`` client, so ``concurrency`` items are in flight over the
whole pool; an item that needs the judge goes to it as soon as its answer is back (one actor
process serves both endpoints: on a small box, process start-up is most of a short run's cost). A failure (unreadable image, HTTP error, timeout, unusable judge reply)
is written into the row's ``error`` / ``judge_error`` and never stops the job.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

from bpo_ray.evaluate.judge import JudgeProtocol, Secret, error_reason, model_client

ANSWER_FIELDS = {"answer": "", "error": "", "latency_s": 0.0}
JUDGE_FIELDS = {"judge_output": "", "judge_value": "", "judge_error": "", "judge_attempts": 0}


@dataclass(frozen=True)
class EndpointSpec:
    """Where and how to call one OpenAI-compatible endpoint from the actors."""

    base_url: str
    model: str
    token: Secret
    concurrency: int = 4
    actors: int = 2
    actor_num_cpus: float = 0.25
    timeout_s: float = 120.0
    max_retries: int = 2
    temperature: float = 0.0

    @property
    def threads_per_actor(self) -> int:
        return max(1, math.ceil(self.concurrency / max(1, self.actors)))


def image_data_url(uri: str, max_bytes: int) -> str:
    """A ``data:`` URL of the image's original bytes, after checking they decode.

    The bytes are sent as stored (not re-encoded like ``bpo_ray.images.to_data_url`` does) so a
    JPEG benchmark image reaches the model pixel-identical to the file.
    """
    from PIL import Image
    import io

    from bpo_ray import storage
    from bpo_ray.images import ImageError, decode_image

    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except storage.StorageError as exc:
        raise ImageError("image_too_large" if "limit" in str(exc) else "missing_image", str(exc)) from exc
    decode_image(data, max_bytes=max_bytes)
    fmt = (Image.open(io.BytesIO(data)).format or "PNG").lower()
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def chat_messages(data_url: str, question: str) -> list[dict[str, Any]]:
    """One user turn: the image as an ``image_url`` part, then the text part."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": question},
    ]}]


def _rows(batch) -> list[dict[str, Any]]:
    return batch.to_dict("records")


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame(rows)


class ImageCache:
    """Data URLs of recently used images: POPE asks several questions about each image."""

    def __init__(self, max_image_bytes: int = 20 * 1024 * 1024, size: int = 64):
        self.max_image_bytes, self.size = max_image_bytes, size
        self.urls: OrderedDict[str, str] = OrderedDict()
        self.lock = threading.Lock()

    def data_url(self, uri: str) -> str:
        with self.lock:
            if uri in self.urls:
                self.urls.move_to_end(uri)
                return self.urls[uri]
        url = image_data_url(uri, self.max_image_bytes)
        with self.lock:
            self.urls[uri] = url
            while len(self.urls) > self.size:
                self.urls.popitem(last=False)
        return url


def answer_row(client, spec: EndpointSpec, images: ImageCache, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` plus ``answer`` (or ``error``) and ``latency_s`` from one model request."""
    out = {**row, **ANSWER_FIELDS}
    started = time.perf_counter()
    try:
        messages = chat_messages(images.data_url(row["image"]), row["question"])
        response = client.chat.completions.create(model=spec.model, messages=messages,
                                                  max_tokens=int(row["max_tokens"]), temperature=spec.temperature)
        out["answer"] = (response.choices[0].message.content or "").strip()
    except Exception as exc:  # recorded per item, never fatal
        out["error"] = error_reason(exc)
    out["latency_s"] = time.perf_counter() - started
    return out


def judge_row(client, spec: EndpointSpec, protocol: JudgeProtocol, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` plus the judge's reply and parsed value, re-asking while the reply is unusable."""
    out = {**row, **JUDGE_FIELDS}
    value: Any = None
    for attempt in range(protocol.attempts):
        request = protocol.build(row, attempt)
        out["judge_attempts"] = attempt + 1
        try:
            response = client.chat.completions.create(model=spec.model, messages=request.messages,
                                                      max_tokens=request.max_tokens, temperature=request.temperature,
                                                      seed=request.seed)
        except Exception as exc:
            out["judge_error"] = error_reason(exc)
            return out
        out["judge_output"] = response.choices[0].message.content or ""
        value = protocol.parse(out["judge_output"])
        if value is not None:
            break
    if value is None:
        out["judge_error"] = "unparsable"
        if protocol.fallback is None:
            return out
        value = protocol.fallback()
    out["judge_value"] = json.dumps(value)
    return out


class BenchmarkItemRunner:
    """Ray Data callable class: each row goes to the model endpoint, then, if it needs one, to the
    judge. One thread per in-flight item; a semaphore keeps judge requests within their own limit.
    ``protocols`` maps benchmark name -> ``JudgeProtocol``."""

    def __init__(self, model: EndpointSpec, judge: Optional[EndpointSpec] = None,
                 protocols: Optional[Mapping[str, JudgeProtocol]] = None, max_image_bytes: int = 20 * 1024 * 1024):
        self.model, self.judge, self.protocols = model, judge, dict(protocols or {})
        self.model_client = model_client(model.base_url, model.token, model.timeout_s, model.max_retries)
        self.judge_client = None
        if judge is not None:
            from bpo_ray.serving.judge.client import judge_client

            self.judge_client = judge_client(judge.base_url, token=judge.token.get(), timeout_s=judge.timeout_s,
                                             max_retries=judge.max_retries)
        self.judge_slots = threading.Semaphore(judge.threads_per_actor if judge else 1)
        self.images = ImageCache(max_image_bytes)
        self.pool = ThreadPoolExecutor(model.threads_per_actor)

    def run(self, row: dict[str, Any]) -> dict[str, Any]:
        out = answer_row(self.model_client, self.model, self.images, row)
        if not row.get("needs_judge") or out["error"] or self.judge is None:
            return {**out, **JUDGE_FIELDS}
        with self.judge_slots:
            return judge_row(self.judge_client, self.judge, self.protocols[row["benchmark"]], out)

    def __call__(self, batch):
        return _frame(list(self.pool.map(self.run, _rows(batch))))


def run_rows(
    rows: Sequence[dict[str, Any]],
    model: EndpointSpec,
    judge: Optional[EndpointSpec] = None,
    protocols: Optional[Mapping[str, JudgeProtocol]] = None,
    runtime_env: Optional[dict[str, Any]] = None,
) -> Iterator[dict[str, Any]]:
    """Stream answered (and judged) rows back to the driver, in completion order. ``runtime_env``:
    the stage's worker environment (``raycluster.worker_runtime_env``: S3 settings, pinning)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    if not rows:
        return iter(())
    if any(r["needs_judge"] for r in rows) and judge is None:
        raise ValueError("rows need the judge but no judge endpoint was given")
    n_blocks = max(1, min(len(rows), 4 * model.actors))
    ds = ray.data.from_items(list(rows), override_num_blocks=n_blocks)
    ds = ds.map_batches(
        BenchmarkItemRunner, fn_constructor_kwargs={"model": model, "judge": judge, "protocols": protocols},
        batch_format="pandas", batch_size=model.threads_per_actor, num_cpus=model.actor_num_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=model.actors), runtime_env=runtime_env)
    return ds.iter_rows()
