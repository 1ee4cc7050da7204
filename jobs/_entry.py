"""Shared shim: run ``bpo-ray <stage>`` from a jobs/ script (the ``ray job submit`` target)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # --working-dir . without an install


def run(stage: str) -> None:
    from bpo_ray.cli import main

    sys.exit(main([stage, *sys.argv[1:]]))
