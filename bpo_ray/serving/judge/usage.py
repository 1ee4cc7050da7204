"""Token and cost accounting per judge client (what ``GET /judge/v1/usage`` reports).

``UsageLedger`` counts in memory; with a ``UsageStore`` (the proxy's case) its counts are added
to a ``usage`` table in the cache's sqlite file, so every replica's requests land in one place and
``/usage`` reports all of them, whichever replica answers it. Counts there accumulate for the
life of the file (like the cached answers): a client's usage over a run is the difference of two
reports (``bpo_ray.evaluate.pipeline.usage_delta``).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields
from typing import Optional

from bpo_ray.serving.judge.db import BUSY_TIMEOUT_S, connect


@dataclass
class Usage:
    requests: int = 0            # answered requests (cache hits included)
    cache_hits: int = 0
    upstream_requests: int = 0   # requests that needed upstream
    upstream_attempts: int = 0   # HTTP calls made upstream, retries included
    retries: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0        # spent upstream
    saved_usd: float = 0.0       # what cache hits would have cost

    def add(self, other: "Usage") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


FIELDS = [f.name for f in fields(Usage)]
SCHEMA = ("CREATE TABLE IF NOT EXISTS usage (client TEXT PRIMARY KEY, "
          + ", ".join(f"{name} {'REAL' if name.endswith('_usd') else 'INTEGER'} NOT NULL DEFAULT 0"
                      for name in FIELDS) + ")")
_UPSERT = (f"INSERT INTO usage (client, {', '.join(FIELDS)}) VALUES (?{', ?' * len(FIELDS)}) "
           f"ON CONFLICT(client) DO UPDATE SET {', '.join(f'{n} = {n} + excluded.{n}' for n in FIELDS)}")


class UsageStore:
    """Per-client counters in the shared sqlite file; ``add`` is one transaction, so concurrent
    replicas never lose each other's increments."""

    def __init__(self, path: str, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self._db = connect(path, SCHEMA, busy_timeout_s)
        self._lock = threading.Lock()

    def add(self, deltas: dict[str, Usage]) -> None:
        rows = [(client, *(getattr(u, n) for n in FIELDS)) for client, u in deltas.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_UPSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def totals(self) -> dict[str, Usage]:
        with self._lock:
            rows = self._db.execute(f"SELECT client, {', '.join(FIELDS)} FROM usage").fetchall()
        return {row[0]: Usage(*row[1:]) for row in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class UsageLedger:
    """Prices and per-client counts. Without a store the counts stay in ``clients``; with one,
    ``record`` only adds to ``pending`` (a dict update: nothing slow on the request path) and the
    owner moves them to the store in batches (``take_pending``, ``store.add``; ``JudgeProxy.flush``)."""

    def __init__(self, price_per_1k_prompt: float, price_per_1k_completion: float,
                 store: Optional[UsageStore] = None):
        self.prices = (price_per_1k_prompt, price_per_1k_completion)
        self.store = store
        self.clients: dict[str, Usage] = {}
        self.pending: dict[str, Usage] = {}

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.prices[0] + completion_tokens / 1000 * self.prices[1]

    def cost(self, usage_block: dict | None) -> tuple[int, int, float]:
        block = usage_block or {}
        p, c = int(block.get("prompt_tokens") or 0), int(block.get("completion_tokens") or 0)
        return p, c, self.price(p, c)

    def record(self, client: str, delta: Usage) -> None:
        (self.clients if self.store is None else self.pending).setdefault(client, Usage()).add(delta)

    def take_pending(self) -> dict[str, Usage]:
        """The counts recorded since the last take, for ``store.add`` (call it on the thread that
        records; ``restore`` them if the store refused)."""
        batch, self.pending = self.pending, {}
        return batch

    def restore(self, batch: dict[str, Usage]) -> None:
        for client, usage in batch.items():
            self.pending.setdefault(client, Usage()).add(usage)

    def counts(self) -> dict[str, Usage]:
        """Every client's counts: the store's (all replicas), else this process's."""
        return self.store.totals() if self.store is not None else self.clients

    def report(self, client: str, counts: Optional[dict[str, Usage]] = None) -> dict:
        counts = self.clients if counts is None else counts
        total = Usage()
        for u in counts.values():
            total.add(u)
        return {"object": "usage", "client": client, "usage": asdict(counts.get(client, Usage())),
                "total": asdict(total), "prices_per_1k": {"prompt": self.prices[0], "completion": self.prices[1]}}
