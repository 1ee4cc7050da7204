"""Persistent cache of deterministic judge requests (sqlite), so re-running an evaluation costs nothing.

A request is cacheable when its answer is reproducible: ``temperature`` 0 or an explicit
``seed``, one choice. The key is the SHA-256 of the canonical JSON (sorted keys, no spaces) of the
request as sent upstream plus the upstream URL; fields that do not change the answer are dropped.

One sqlite file in WAL mode is shared by every proxy replica (process) on the host:

- readers never wait for writers (WAL), so a hit is one primary-key ``SELECT`` done inline, and it
  returns the stored JSON text as bytes (nothing is parsed or re-serialised on the hit path);
- writes are ``INSERT OR IGNORE`` in their own transaction: when replicas race on one key the first
  answer stored wins, every later reader (and the losing writer, which ``put`` hands the winner)
  sees that one value, so a key never changes once written;
- each process holds one reader and one writer connection, opened once; writers wait for each
  other up to ``busy_timeout_s`` (sqlite's busy handler) instead of failing (``db.connect``).

WAL needs the processes on one host (shared memory): not a network file system.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bpo_ray.serving.judge.db import BUSY_TIMEOUT_S, connect

IGNORED_FIELDS = ("stream", "stream_options", "user", "metadata", "store")
SCHEMA = ("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, "
          "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")


def is_deterministic(body: dict[str, Any]) -> bool:
    if body.get("n", 1) != 1 or body.get("stream"):
        return False
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(body: dict[str, Any], upstream: str) -> str:
    payload = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    canonical = json.dumps({"upstream": upstream, "request": payload}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """A stored response as the client gets it (JSON bytes) and its token counts (for accounting)."""

    body: bytes
    prompt_tokens: int
    completion_tokens: int


def _encode(response: dict) -> str:
    return json.dumps(response, ensure_ascii=False, separators=(",", ":"))


class JudgeCache:
    """``key -> response JSON`` in one sqlite file, shared by processes and threads (see the module doc)."""

    def __init__(self, path: str, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.path = str(Path(path).expanduser())
        self._writer = connect(self.path, SCHEMA, busy_timeout_s)
        self._reader = connect(self.path, SCHEMA, busy_timeout_s, read_only=True)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    def get_raw(self, key: str) -> Optional[CachedAnswer]:
        """The stored answer as bytes, or None. Never waits for writers (WAL): fine on an event loop."""
        with self._read_lock:
            row = self._reader.execute("SELECT response, prompt_tokens, completion_tokens FROM responses "
                                       "WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return CachedAnswer(row[0].encode(), int(row[1] or 0), int(row[2] or 0))

    def get(self, key: str) -> Optional[dict]:
        found = self.get_raw(key)
        return json.loads(found.body) if found is not None else None

    def put(self, key: str, response: dict) -> dict:
        """Store ``response`` unless ``key`` already has an answer; returns the answer stored under
        ``key`` (the first writer's). May wait for other writers: call it off the event loop."""
        usage = response.get("usage") or {}
        with self._write_lock:
            cur = self._writer.execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?)",
                                       (key, _encode(response), usage.get("prompt_tokens"),
                                        usage.get("completion_tokens"), time.time()))
            if cur.rowcount == 1:
                return response
            row = self._writer.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0])

    def __len__(self) -> int:
        with self._read_lock:
            return int(self._reader.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._writer.close()
