"""Load and validate images from bytes, URIs and data URLs, with reasons a quarantine can record.

Pillow's decompression-bomb guard is turned into an ordinary, named error; images are always
returned fully decoded as RGB so truncated files fail here, not later inside a model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from typing import Optional

from PIL import Image, UnidentifiedImageError

from bpo_ray import storage

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
_DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+)?(;base64)?,(.*)$", re.S)


class ImageError(ValueError):
    """An image could not be used; ``reason`` is a short, stable label for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to a fully loaded RGB image or raise ``ImageError``."""
    if len(data) == 0:
        raise ImageError("empty_image", "zero bytes")
    if len(data) > max_bytes:
        raise ImageError("image_too_large", f"{len(data)} bytes > {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("image_too_large", f"{w}x{h} pixels > {max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("unreadable_image", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt_image", str(exc)) from exc
    if w == 0 or h == 0:
        raise ImageError("corrupt_image", "zero-sized image")
    return img.convert("RGB")


def load_image(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Image.Image, str]:
    """Read and decode an image from a local path or URI; returns ``(image, sha256 of bytes)``."""
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except storage.StorageError as exc:
        reason = "image_too_large" if "limit" in str(exc) else "missing_image"
        raise ImageError(reason, str(exc)) from exc
    return decode_image(data, max_bytes=max_bytes), hashlib.sha256(data).hexdigest()


def to_data_url(img: Image.Image, fmt: str = "PNG") -> str:
    """Encode an image as a ``data:image/...;base64,`` URL (what OpenAI-style clients send)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def decode_data_url(url: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Decode a base64 ``data:`` URL to an RGB image or raise ``ImageError``."""
    m = _DATA_URL.match(url)
    if not m or not m.group(2):
        raise ImageError("bad_image_url", "expected data:image/...;base64,...")
    payload = m.group(3)
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError("image_too_large", f"about {len(payload) * 3 // 4} bytes > {max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("bad_base64", str(exc)) from exc
    return decode_image(data, max_bytes=max_bytes)


def resolve_image_uri(image: str, images_root: Optional[str]) -> str:
    """An absolute URI for a record's ``image`` field, relative to ``images_root`` when not absolute."""
    if "://" in image or image.startswith("/") or not images_root:
        return image
    return storage.join(images_root, image)
