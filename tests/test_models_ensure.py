"""Stages find their models or say how to get them, before Ray starts (``bpo_ray.models.ensure``)."""

from __future__ import annotations

import pytest

from bpo_ray.config.shared import ModelsConfig
from bpo_ray.models.checkpoint import weights_sha256
from bpo_ray.models.ensure import ModelsMissing, ensure_models


def test_embedded_default_builds_tiny_models_once_and_returns_absolute_paths(tmp_path, monkeypatch, capsys, tiny_models):
    monkeypatch.chdir(tmp_path)
    models = ModelsConfig(mllm="runs/tiny/models/llava", text_llm="runs/tiny/models/text_lm")
    resolved = ensure_models(models, ["mllm", "text_llm"], "tiny", "generate")
    assert "built the tiny random-init models" in capsys.readouterr().err
    assert resolved.mllm == str(tmp_path / "runs/tiny/models/llava")
    assert resolved.text_llm == str(tmp_path / "runs/tiny/models/text_lm")
    # the same deterministic build as `bpo-ray models tiny` (seed 0)
    assert weights_sha256(resolved.mllm) == weights_sha256(tiny_models["mllm"])
    assert not list((tmp_path / "runs/tiny/models").glob(".tiny-build-*"))  # no temp dir left behind

    again = ensure_models(models, ["mllm", "text_llm"], "tiny", "train")
    assert again == resolved and "built" not in capsys.readouterr().err


def test_other_configs_fail_with_the_command_and_build_nothing(tmp_path):
    models = ModelsConfig(mllm=f"{tmp_path}/m/llava", text_llm=f"{tmp_path}/m/text_lm")
    with pytest.raises(ModelsMissing, match=rf"bpo-ray reference: model not found: models.mllm={tmp_path}/m/llava; "
                                            rf"build them with `bpo-ray models tiny --out {tmp_path}/m`"):
        ensure_models(models, ["mllm"], "llava-1.5-7b", "reference")
    assert not (tmp_path / "m").exists()


def test_a_layout_tiny_cannot_fill_fails_even_for_the_embedded_default(tmp_path):
    models = ModelsConfig(mllm=f"{tmp_path}/mine", text_llm=f"{tmp_path}/other/text_lm")
    with pytest.raises(ModelsMissing, match="point models.mllm / models.text_llm at HF-format checkpoints"):
        ensure_models(models, ["mllm"], "tiny", "train")


def test_only_the_needed_models_and_never_remote_ones_are_checked(tmp_path, tiny_models):
    models = ModelsConfig(mllm=tiny_models["mllm"], text_llm=f"{tmp_path}/missing/text_lm")
    assert ensure_models(models, ["mllm"], "custom", "train").mllm == tiny_models["mllm"]
    remote = ModelsConfig(mllm="s3://bucket/llava", text_llm="llava-hf/llava-1.5-7b-hf")
    assert ensure_models(remote, ["mllm", "text_llm"], "custom", "generate") == remote
