"""Per-item seeds derived from (config seed, item id, purpose): the same on every backend,
every batch composition and every rerun, so a resumed shard regenerates the same negatives."""

from __future__ import annotations

import hashlib
import json
from typing import Any

MAX_SEED = 2**63 - 1


def derive_seed(base_seed: int, *parts: Any) -> int:
    """A 63-bit seed from the base seed and any JSON-able parts (stable across processes)."""
    blob = json.dumps([int(base_seed), *parts], sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & MAX_SEED


def noise_seed(base_seed: int, item_id: str, step: int) -> int:
    """Seed of the diffusion noise for ``item_id`` at noise step ``step``."""
    return derive_seed(base_seed, "noise", item_id, int(step))


def sampling_seed(base_seed: int, strategy: str, item_id: str, index: int = 0) -> int:
    """Seed of the ``index``-th sampled answer of ``strategy`` for ``item_id``."""
    return derive_seed(base_seed, "sample", strategy, item_id, int(index))
