"""Helpers shared by the Ray Data stages: which rows to work on, their images, JSON columns.

Every stage receives *all* rows (quarantined ones included) and passes them through, adding one
``neg_<strategy>`` column: a JSON list of negatives, each ``{"text": ..., provenance...}`` or
``{"failed": reason}``. Keeping every row in one stream makes per-shard accounting exact.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from bpo_ray.images import ImageError, decode_image


def ok_indices(batch: dict[str, np.ndarray]) -> list[int]:
    return [i for i, s in enumerate(batch["status"]) if s == "ok"]


def rows_by_group(batch: dict[str, np.ndarray], rows: Sequence[int]) -> list[list[int]]:
    """``rows`` split by their generation ``group``, groups in ascending order.

    A model runs each group as one batch, so what an item gets depends only on its group (fixed
    by its position in its shard), never on how Ray Data happened to bundle blocks into a call:
    padding, batch shapes and a sampled batch's seed are the same on every run and resume.
    """
    if "group" not in batch:
        return [list(rows)] if len(rows) else []
    groups: dict[int, list[int]] = {}
    for i in rows:
        groups.setdefault(int(batch["group"][i]), []).append(i)
    return [groups[g] for g in sorted(groups)]


def decode_rows_images(batch: dict[str, np.ndarray], rows: Sequence[int]) -> dict[int, Image.Image | str]:
    """Row index -> decoded RGB image, or the ImageError reason if it no longer decodes."""
    out: dict[int, Image.Image | str] = {}
    for i in rows:
        try:
            out[i] = decode_image(bytes(batch["image_bytes"][i]))
        except ImageError as exc:
            out[i] = exc.reason
    return out


def decoded_batch(batch: dict[str, np.ndarray]) -> tuple[dict[int, Image.Image], list[int], list[list[dict]]]:
    """What every model stage starts from: ``(images, rows, negatives)``. ``images`` maps each
    usable row whose image decodes to it, ``rows`` lists those rows in order, and ``negatives``
    (one list per row) already holds ``{"failed": reason}`` for a row whose image no longer decodes."""
    negatives: list[list[dict]] = [[] for _ in range(len(batch["order"]))]
    images: dict[int, Image.Image] = {}
    for i, img in decode_rows_images(batch, ok_indices(batch)).items():
        if isinstance(img, str):
            negatives[i] = [{"failed": img}]
        else:
            images[i] = img
    return images, list(images), negatives


def image_png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def with_column(batch: dict[str, np.ndarray], name: str, values: Iterable[Any],
                drop: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of ``batch`` plus column ``name`` (JSON-encoded values), minus ``drop`` columns."""
    out = {k: v for k, v in batch.items() if k not in drop}
    out[name] = np.array([json.dumps(v) for v in values], dtype=object)
    return out


def sampling_record(backend: str, sampling, **extra: Any) -> dict[str, Any]:
    """The ``sampling`` provenance of a pair (stored as JSON in the pairs table)."""
    rec = {"backend": backend, "max_new_tokens": sampling.max_new_tokens,
           "temperature": sampling.temperature, "top_p": sampling.top_p}
    rec.update(extra)
    return rec
