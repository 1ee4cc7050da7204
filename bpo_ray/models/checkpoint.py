"""Save checkpoints that load in transformers 5 and in vLLM 0.32 alike."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors.torch import load_file, save_file


def save_portable(model, processor_or_tokenizer, out: str | Path) -> Path:
    """``save_pretrained`` the model and its processor/tokenizer, then fix key layouts for vLLM.

    transformers 5 saves LLaVA's CLIP tower as ``...vision_tower.*``; vLLM 0.32 loads the older
    ``vision_tower.vision_model.*`` layout. transformers reads both, so the older one is written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor_or_tokenizer.save_pretrained(out)
    if getattr(model.config, "model_type", "") == "llava":
        _rewrite_vision_keys(out)
    return out


def _rewrite_vision_keys(out: Path) -> None:
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        renamed = {}
        changed = False
        for key, value in tensors.items():
            new = key
            marker = "vision_tower."
            if marker in key and "vision_tower.vision_model." not in key:
                head, tail = key.split(marker, 1)
                new = f"{head}{marker}vision_model.{tail}"
                changed = True
            renamed[new] = value.contiguous()
        if changed:
            save_file(renamed, shard, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {
            (k.replace("vision_tower.", "vision_tower.vision_model.", 1)
             if "vision_tower." in k and "vision_tower.vision_model." not in k else k): v
            for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data, indent=2))


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over a checkpoint's ``*.safetensors`` files (name and bytes, sorted): the model's identity."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def local_weights_sha256(uri: str) -> str | None:
    """``weights_sha256`` of a local checkpoint dir; None for a remote URI, a hub id or a dir without
    ``*.safetensors`` (their identity is then the URI alone)."""
    path = Path(uri).expanduser()
    if "://" in uri or not path.is_dir() or not any(path.glob("*.safetensors")):
        return None
    return weights_sha256(path)
