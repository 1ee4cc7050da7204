"""Precomputed reference log-probs are used only with the model (by its weights), dtype and scoring
they were computed with (``trainer.check_reference_settings``); issue #19's "likely bug"."""

from __future__ import annotations

import shutil

import pytest

from bpo_ray.config import load_config
from bpo_ray.schemas import Manifest, ManifestCounts, write_manifest
from bpo_ray.train.data import PairsError
from bpo_ray.train.reference import reference_settings
from bpo_ray.train.trainer import check_reference_settings


def _cfg(mllm: str, *overrides: str):
    return load_config("tiny", [f"models.mllm={mllm}", *overrides])


def _reference_output(tmp_path, cfg) -> str:
    """A reference stage's output dir: ``pairs/`` plus the manifest the reference pass writes."""
    out = tmp_path / "reference"
    (out / "pairs").mkdir(parents=True)
    (out / "pairs" / "part-0.parquet").write_bytes(b"")  # only the layout matters to the check
    write_manifest(Manifest(stage="reference", counts=ManifestCounts(items_in=1, paired=1, pairs_written=1),
                            config={"reference_settings": reference_settings(cfg)}), str(out / "manifest.json"))
    return str(out)


def test_same_model_dtype_and_scoring_pass(tmp_path, tiny_models):
    cfg = _cfg(tiny_models["mllm"])
    pairs = _reference_output(tmp_path, cfg)
    assert reference_settings(cfg)["model_sha256"]  # a local checkpoint is identified by its weights
    check_reference_settings(pairs, cfg.train, cfg.models)


def test_a_copy_of_the_same_weights_elsewhere_passes(tmp_path, tiny_models):
    pairs = _reference_output(tmp_path, _cfg(tiny_models["mllm"]))
    copy = shutil.copytree(tiny_models["mllm"], tmp_path / "moved" / "llava")
    cfg = _cfg(str(copy))
    check_reference_settings(pairs, cfg.train, cfg.models)


def test_other_weights_fail_naming_the_digests(tmp_path, tiny_models):
    from bpo_ray.models.tiny import build_tiny_models

    pairs = _reference_output(tmp_path, _cfg(tiny_models["mllm"]))
    other = build_tiny_models(tmp_path / "other", seed=1)["mllm"]  # same architecture, other weights
    cfg = _cfg(other)
    with pytest.raises(PairsError, match=r"model_sha256: pairs have '[0-9a-f]{64}', train has '[0-9a-f]{64}'"):
        check_reference_settings(pairs, cfg.train, cfg.models)


def test_other_dtype_fails(tmp_path, tiny_models):
    pairs = _reference_output(tmp_path, _cfg(tiny_models["mllm"]))
    cfg = _cfg(tiny_models["mllm"], "models.dtype=bfloat16")
    with pytest.raises(PairsError, match=r"dtype: pairs have 'float32', train has 'bfloat16'"):
        check_reference_settings(pairs, cfg.train, cfg.models)


def test_other_scoring_still_fails(tmp_path, tiny_models):
    pairs = _reference_output(tmp_path, _cfg(tiny_models["mllm"]))
    cfg = _cfg(tiny_models["mllm"], "train.max_length=128")
    with pytest.raises(PairsError, match="max_length: pairs have 256, train has 128"):
        check_reference_settings(pairs, cfg.train, cfg.models)


def test_a_remote_model_is_identified_by_its_uri(tmp_path, tiny_models):
    pairs = _reference_output(tmp_path, _cfg("s3://models/llava-a"))
    cfg = _cfg("s3://models/llava-b")
    with pytest.raises(PairsError, match="model: pairs have 's3://models/llava-a', train has 's3://models/llava-b'"):
        check_reference_settings(pairs, cfg.train, cfg.models)
    same = _cfg("s3://models/llava-a")
    check_reference_settings(pairs, same.train, same.models)
