"""``bpo-ray world build``: the base-model recipe and its measurements, at a size a test affords.

The recipe's defaults take minutes; here every step count is cut to a handful so the test checks
the plumbing (files, formats, cache, determinism, the printed summary), not the targets. The
targets are measured by the full command and recorded in docs/world.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bpo_ray.world import cli
from bpo_ray.world.base_model import weights_sha256

SMALL = [
    "world.n_scenes=45", "world.corpus_lines=300",
    "world.base_model.pretrain_steps=8", "world.base_model.pretrain_batch_size=4",
    "world.base_model.max_length=64", "world.base_model.injection_documents=30",
    "world.base_model.vision_steps=4", "world.base_model.vision_batch_size=8",
    "world.base_model.projector_steps=4", "world.base_model.align_steps=4",
    "world.base_model.align_batch_size=4", "world.base_model.warmup_steps=2",
    "world.base_model.existence_steps=3", "world.base_model.existence_questions=20",
    "world.base_model.align_text_share=0.25",  # exercises the text-only rows of the alignment mix
    "world.eval.noise_steps=[0,500]", "world.eval.max_new_tokens=16",
]


def _argv(out: Path, *extra: str) -> list[str]:
    argv = ["build", "--out", str(out)]
    for override in (*SMALL, *extra):
        argv += ["--set", override]
    return argv


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wb")
    import contextlib
    import io

    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(_argv(root / "world"))
    return {"root": root, "rc": rc, "stdout": printed.getvalue(), "seconds": time.perf_counter() - started}


def test_build_writes_world_models_and_measurements(built):
    root = built["root"]
    assert built["rc"] == 0, built["stdout"]
    assert (root / "world" / "world.json").exists() and (root / "world" / "test.jsonl").exists()
    meta = json.loads((root / "models" / "base_model.json").read_text())
    assert set(meta["paths"]) == {"mllm", "text_llm"}
    for stage in ("pretrain", "vision", "projector", "existence", "align"):
        assert meta[stage]["last_loss"] == meta[stage]["last_loss"]  # not NaN
    evaluation = json.loads((root / "world" / "base_eval" / "base_eval.json").read_text())
    assert {"chair_s", "chair_i", "recall", "prior_typical_share"} <= set(evaluation["chair"])
    assert set(evaluation["pope"]) == {"random", "popular", "adversarial"}
    assert [p["noise_step"] for p in evaluation["noise_curve"]["points"]] == [0, 500]
    png = root / "world" / "base_eval" / "noise_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = built["stdout"]
    assert "CHAIR_s" in out and "CHAIR_i" in out and "POPE random" in out and "F1" in out


def test_models_load_in_transformers_and_answer(built):
    from bpo_ray.models.loading import load_mllm, load_text_lm
    from bpo_ray.world.evaluate_base import answer_questions

    meta = json.loads((built["root"] / "models" / "base_model.json").read_text())
    model, processor = load_mllm(meta["paths"]["mllm"], device="cpu")
    text_lm, tokenizer = load_text_lm(meta["paths"]["text_llm"], device="cpu")
    assert len(tokenizer) == len(processor.tokenizer)
    record = json.loads((built["root"] / "world" / "test.jsonl").read_text().splitlines()[0])
    answers = answer_questions(model, processor, built["root"] / "world", [record["image"]], ["Describe the image."],
                               max_new_tokens=8)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_second_build_is_cached_and_keyed_on_the_recipe(built, capsys):
    meta_path = built["root"] / "models" / "base_model.json"
    before = meta_path.read_text()
    started = time.perf_counter()
    assert cli.main(_argv(built["root"] / "world")) == 0
    assert time.perf_counter() - started < built["seconds"]
    assert meta_path.read_text() == before
    from bpo_ray.config.shared import NumericsConfig
    from bpo_ray.config.world import BaseModelConfig
    from bpo_ray.world.base_model import _cache_key, read_world

    world = read_world(built["root"] / "world")
    pinned, native = NumericsConfig(cpu_isa="avx2", threads=2), NumericsConfig()
    assert _cache_key(world, BaseModelConfig(align_steps=5), 0, pinned) != _cache_key(world, BaseModelConfig(align_steps=4), 0, pinned)
    # a model built with other kernels is another model: never served from the cache
    assert _cache_key(world, BaseModelConfig(), 0, pinned) != _cache_key(world, BaseModelConfig(), 0, native)


def test_recipe_is_deterministic(built, tmp_path):
    assert cli.main([*_argv(tmp_path / "world"), "--no-eval"]) == 0
    first = json.loads((built["root"] / "models" / "base_model.json").read_text())["paths"]
    second = json.loads((tmp_path / "models" / "base_model.json").read_text())["paths"]
    for name in ("mllm", "text_llm"):
        assert weights_sha256(Path(first[name])) == weights_sha256(Path(second[name]))


def test_missing_world_dir_for_models_is_a_clear_error(tmp_path, capsys):
    from bpo_ray.world.base_model import build_base_model

    with pytest.raises(FileNotFoundError, match="build the world first"):
        build_base_model(tmp_path / "nowhere", tmp_path / "models")
