"""Use a trained adapter: load it over the base model, or merge it into a standalone checkpoint."""

from __future__ import annotations

import tempfile

from bpo_ray import storage
from bpo_ray.models.checkpoint import save_portable
from bpo_ray.models.loading import load_mllm


def load_with_adapter(base_uri: str, adapter_uri: str, dtype: str = "float32", device: str = "cpu",
                      cache_dir: str = "~/.cache/bpo-ray/models"):
    """``(PeftModel, processor)``: the base MLLM with the trained adapter (``PeftModel.from_pretrained``)."""
    from peft import PeftModel

    model, processor = load_mllm(base_uri, dtype=dtype, device=device, cache_dir=cache_dir)
    adapter_dir = storage.localize(adapter_uri, cache_dir)
    return PeftModel.from_pretrained(model, adapter_dir).eval(), processor


def export_merged(base_uri: str, adapter_uri: str, out_uri: str, dtype: str = "float32",
                  cache_dir: str = "~/.cache/bpo-ray/models") -> str:
    """Merge the adapter into the base weights and save a checkpoint transformers and vLLM load."""
    model, processor = load_with_adapter(base_uri, adapter_uri, dtype=dtype, device="cpu", cache_dir=cache_dir)
    merged = model.merge_and_unload()
    if not storage.is_remote(out_uri):
        save_portable(merged, processor, storage.localize(out_uri))
        return out_uri
    with tempfile.TemporaryDirectory(prefix="bpo-merged-") as tmp:
        save_portable(merged, processor, tmp)
        storage.upload_dir(tmp, out_uri)
    return out_uri
