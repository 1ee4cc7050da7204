"""Persistent cache of deterministic judge requests (sqlite), so re-running an evaluation costs nothing.

A request is cacheable when its answer is reproducible: ``temperature`` 0 or an explicit
``seed``, one choice. The key is the SHA-256 of the canonical JSON (sorted keys, no spaces) of the
request as sent upstream plus the upstream URL; fields that do not change the answer are dropped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

IGNORED_FIELDS = ("stream", "stream_options", "user", "metadata", "store")


def is_deterministic(body: dict[str, Any]) -> bool:
    if body.get("n", 1) != 1 or body.get("stream"):
        return False
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(body: dict[str, Any], upstream: str) -> str:
    payload = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    canonical = json.dumps({"upstream": upstream, "request": payload}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class JudgeCache:
    """``key -> response JSON`` in one sqlite file; safe to share between threads of one process."""

    def __init__(self, path: str):
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(Path(path).expanduser()), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, "
                         "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, response: dict) -> None:
        usage = response.get("usage") or {}
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (key, json.dumps(response), usage.get("prompt_tokens"), usage.get("completion_tokens"),
                              time.time()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
