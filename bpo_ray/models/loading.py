"""Load the MLLM and the text LLM from a local dir, an ``s3://`` URI or (on clusters) a hub id.

The same functions load ``llava-hf/llava-1.5-7b-hf`` on a GPU node and the tiny models here;
dtype and device are config, never a separate code path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bpo_ray import numerics, storage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(uri: str, cache_dir: str = "~/.cache/bpo-ray/models") -> str:
    """Local directory for ``uri``: s3:// trees are cached locally; hub ids pass through."""
    if storage.is_remote(uri):
        return storage.localize(uri, cache_dir)
    local = Path(uri).expanduser()
    if local.exists():
        return str(local)
    if uri.count("/") == 1 and not uri.startswith((".", "/")):
        return uri  # a hub id such as llava-hf/llava-1.5-7b-hf (cluster nodes with hub access)
    raise FileNotFoundError(f"model {uri!r} not found (build tiny models with `bpo-ray models tiny`)")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_mllm(uri: str, dtype: str = "float32", device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models"):
    """Return ``(model, processor)`` for a LLaVA-architecture checkpoint, in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    numerics.resolve_vml_dispatch()  # before any multi-threaded op (pytorch/pytorch #188792)
    path = resolve_model_path(uri, cache_dir)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype])
    model.to(pick_device(device)).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def load_text_lm(uri: str, dtype: str = "float32", device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models"):
    """Return ``(model, tokenizer)`` for a causal LM checkpoint, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    numerics.resolve_vml_dispatch()  # before any multi-threaded op (pytorch/pytorch #188792)
    path = resolve_model_path(uri, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.to(pick_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
