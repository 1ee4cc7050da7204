"""Tiny models: deterministic, HF-loadable, and vLLM gives the same greedy text as transformers."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bpo_ray.models.loading import load_mllm, load_text_lm
from bpo_ray.models.prompts import build_prompt
from bpo_ray.models.tiny import build_tiny_models


def _digest(d: str) -> str:
    return hashlib.sha256(Path(d, "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path, tiny_models):
    again = build_tiny_models(tmp_path / "again", seed=0)
    assert _digest(again["mllm"]) == _digest(tiny_models["mllm"])
    assert Path(again["mllm"], "tokenizer.json").read_bytes() == Path(tiny_models["mllm"], "tokenizer.json").read_bytes()
    other = build_tiny_models(tmp_path / "other", seed=1)
    assert _digest(other["mllm"]) != _digest(tiny_models["mllm"])


def test_text_lm_shares_the_tokenizer(tiny_models):
    _, tok_a = load_text_lm(tiny_models["text_llm"], device="cpu")
    _, proc = load_mllm(tiny_models["mllm"], device="cpu")
    text = "There is a red cup on the left."
    assert tok_a(text)["input_ids"] == proc.tokenizer(text)["input_ids"]


def _image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))


@pytest.mark.slow
def test_vllm_and_transformers_greedy_text_identical(tiny_models):
    from vllm import SamplingParams

    from bpo_ray.models.vllm_engine import make_llm

    model, proc = load_mllm(tiny_models["mllm"], device="cpu")
    prompt = build_prompt("Describe the image in detail.")
    inputs = proc(images=_image(), text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    hf_text = proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    llm = make_llm(tiny_models["mllm"], max_model_len=512)
    res = llm.generate({"prompt": prompt, "multi_modal_data": {"image": _image()}},
                       SamplingParams(temperature=0, max_tokens=16))
    assert res[0].outputs[0].text == hf_text
    assert len(hf_text) > 0


def test_models_load_from_s3_through_the_same_loaders(tiny_models, s3_server, tmp_path):
    """``load_mllm`` / ``load_text_lm`` take an s3:// URI (the loopback S3 server) as they take a local
    dir: the tree is downloaded once into the cache and gives the same weights and outputs."""
    import torch

    from bpo_ray import storage
    from bpo_ray.models.loading import resolve_model_path

    cache = str(tmp_path / "cache")
    uris = {}
    for name in ("mllm", "text_llm"):
        uris[name] = storage.join(s3_server["root"], "models", name)
        storage.upload_dir(tiny_models[name], uris[name])
    remote, remote_proc = load_mllm(uris["mllm"], device="cpu", cache_dir=cache)
    local, _ = load_mllm(tiny_models["mllm"], device="cpu")
    inputs = remote_proc(images=Image.new("RGB", (32, 32), (10, 200, 30)),
                         text=build_prompt("What is in the image?"), return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(remote(**inputs).logits, local(**inputs).logits)
    text_remote, tok = load_text_lm(uris["text_llm"], device="cpu", cache_dir=cache)
    text_local, _ = load_text_lm(tiny_models["text_llm"], device="cpu")
    ids = tok("a red cube", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(text_remote(**ids).logits, text_local(**ids).logits)
    cached = resolve_model_path(uris["mllm"], cache)
    marker = Path(cached, ".complete")
    assert cached.startswith(cache) and marker.exists()
    stamp = marker.stat().st_mtime_ns
    assert resolve_model_path(uris["mllm"], cache) == cached  # unchanged tree: served from the cache
    assert marker.stat().st_mtime_ns == stamp
