"""The train loop's ``metrics.jsonl`` and its memory figure."""

from __future__ import annotations

import json
import os

from bpo_ray import storage
from bpo_ray.train.timeline import peak_rss_mb  # noqa: F401  (the loop's memory figure)


class MetricsLog:
    """``metrics.jsonl`` on local disk (appended) or object storage (rewritten on ``flush``)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.remote = storage.is_remote(uri)
        self.lines: list[str] = []
        if self.remote and storage.exists(uri):
            self.lines = storage.read_text(uri).splitlines()

    def write(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True)
        if self.remote:
            self.lines.append(line)
            return
        path = storage.filesystem(self.uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def flush(self) -> None:
        if self.remote:
            storage.write_text(self.uri, "".join(line + "\n" for line in self.lines))

