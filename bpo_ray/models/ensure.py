"""Make sure a stage's models exist before it starts Ray.

The embedded default (``configs/tiny.yaml``) points at ``runs/tiny/models/{llava,text_lm}``. On a
fresh checkout nothing is there; rather than fail inside a Ray actor, the stage builds the tiny
random-init models (``bpo_ray.models.tiny.build_tiny_models``: deterministic, a few seconds) on
first use. ``bpo-ray world build`` later replaces them with the world's trained base model (its
``base_model.json`` cache key never matches these). Any other missing local model fails here, before
Ray starts, with the command that builds it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from bpo_ray import storage
from bpo_ray.config.shared import ModelsConfig

#: Sub-directories ``build_tiny_models(out)`` writes, by ``ModelsConfig`` field.
TINY_LAYOUT = {"mllm": "llava", "text_llm": "text_lm"}


class ModelsMissing(FileNotFoundError, ValueError):
    """A configured local model is not there and cannot be built here."""


def _is_local_path(uri: str) -> bool:
    # a hub id (``org/name``) is resolved by the nodes that have hub access (models.loading)
    if storage.is_remote(uri):
        return False
    return not (uri.count("/") == 1 and not uri.startswith((".", "/", "~")))


def _present(path: Path) -> bool:
    return (path / "config.json").exists()


def tiny_models_dir(models: ModelsConfig) -> Path | None:
    """The ``out`` of ``build_tiny_models`` when both model paths follow its layout, else None."""
    mllm, text_lm = Path(models.mllm).expanduser(), Path(models.text_llm).expanduser()
    if mllm.name != TINY_LAYOUT["mllm"] or text_lm.name != TINY_LAYOUT["text_llm"] or mllm.parent != text_lm.parent:
        return None
    return mllm.parent


def build_tiny_atomically(out: Path, seed: int = 0) -> None:
    """``build_tiny_models`` into a temp dir beside ``out``, then move each missing model in, so a
    concurrent stage never sees a half-written checkpoint and a present model is never replaced."""
    from bpo_ray.models.tiny import build_tiny_models

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=out))
    try:
        build_tiny_models(tmp, seed=seed)
        for name in (*TINY_LAYOUT.values(), "tiny.json"):
            target = out / name
            if not target.exists():
                try:
                    os.rename(tmp / name, target)
                except OSError:
                    if not target.exists():  # lost a race to another builder: theirs is identical
                        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def absolute_if_local(uri: str) -> str:
    """An existing local path as an absolute one (Ray workers of a joined cluster run in another
    working directory); URIs, hub ids and missing paths unchanged."""
    if not _is_local_path(uri) or uri.startswith("file://"):
        return uri
    path = Path(uri).expanduser()
    return str(path.resolve()) if path.exists() else uri


def ensure_models(models: ModelsConfig, needed: Iterable[str], config_name: str, stage: str) -> ModelsConfig:
    """Check that the ``needed`` models (``"mllm"``, ``"text_llm"``) exist; build the tiny ones on
    first use for the embedded default; otherwise raise ``ModelsMissing`` naming the command.

    Returns ``models`` with local paths made absolute, for the stage to hand to its Ray workers.
    """
    missing = {k: getattr(models, k) for k in needed
               if _is_local_path(getattr(models, k)) and not _present(Path(getattr(models, k)).expanduser())}
    out = tiny_models_dir(models)
    if missing and config_name == "tiny" and out is not None:
        started = time.perf_counter()
        build_tiny_atomically(out)
        print(f"bpo-ray {stage}: no models under {out}; built the tiny random-init models there "
              f"({time.perf_counter() - started:.1f}s; `bpo-ray world build` replaces them with the world's "
              "trained base model)", file=sys.stderr, flush=True)
    elif missing:
        raise _missing_error(missing, out, stage)
    return models.model_copy(update={"mllm": absolute_if_local(models.mllm),
                                     "text_llm": absolute_if_local(models.text_llm)})


def _missing_error(missing: dict[str, str], out: Path | None, stage: str) -> ModelsMissing:
    what = ", ".join(f"models.{k}={v}" for k, v in missing.items())
    if out is not None:
        hint = (f"build them with `bpo-ray models tiny --out {out}` (random init) or "
                f"`bpo-ray world build --models-out {out}` (the bias world's base model)")
    else:
        hint = "point models.mllm / models.text_llm at HF-format checkpoints (`bpo-ray models tiny --out DIR` builds tiny ones)"
    return ModelsMissing(f"bpo-ray {stage}: model not found: {what}; {hint}")
