"""The judge proxy's one sqlite file (answers and usage), opened the same way by every replica.

WAL journal (readers never wait for writers; several processes on one host share the file),
``synchronous=NORMAL`` (an answer survives a crashed process; a power cut may drop the last few,
which only costs a repeat upstream call), autocommit connections (each statement is its own
transaction unless ``BEGIN`` says otherwise) and a busy timeout, so a writer waits for another
instead of failing with "database is locked".
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
BUSY_TIMEOUT_S = 30.0


def retry_locked(step: Callable[[], T], timeout_s: float = BUSY_TIMEOUT_S) -> T:
    """``step()``, retried while sqlite says the file is locked. Switching to WAL and creating
    tables can race another process opening the same new file; ordinary statements wait in
    sqlite's busy handler instead."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def connect(path: str, schema: str = "", busy_timeout_s: float = BUSY_TIMEOUT_S,
            read_only: bool = False) -> sqlite3.Connection:
    """A connection to ``path`` (created with its parent folder if missing) in WAL mode, with
    ``schema`` (``CREATE TABLE IF NOT EXISTS ...``) applied. Usable from any thread; callers
    serialise their own use of it."""
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(file), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL").fetchone(), busy_timeout_s)
    if schema:
        retry_locked(lambda: db.execute(schema), busy_timeout_s)
    db.execute("PRAGMA synchronous=NORMAL")
    if read_only:
        db.execute("PRAGMA query_only=1")
    return db
