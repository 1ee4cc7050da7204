"""Train stage end to end on a real local Ray cluster: the reference pass (Ray Data), LoRA DPO with
2 Ray Train workers under DeepSpeed ZeRO-2 and ZeRO-3 on CPU, a worker killed mid-run and a job
submitted again (both resume from the checkpoint), SFT, and the adapter in transformers and vLLM.

Runs are small (tiny LLaVA, 32 bias-world pairs, 6 steps) with a high learning rate so the loss
falls visibly within them.
"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.schemas import read_manifest
from bpo_ray.train.loop import FAIL_AT_STEP_ENV
from bpo_ray.train.plots import read_metrics
from bpo_ray.train.reference import run_reference
from bpo_ray.train.trainer import run_training
from train_pairs import build_pairs_rows, records_by_attempt, write_pairs

pytestmark = pytest.mark.slow

LONG_PROMPT = "Describe " + "every small detail, " * 120 + "please."


def _cfg(tiny_models, *overrides: str):
    return load_config("tiny", [
        f"models.mllm={tiny_models['mllm']}", "train.per_device_batch_size=4", "train.num_workers=2",
        "train.epochs=1.5", "train.lr=5e-3", "train.warmup_ratio=0", "train.checkpoint_every=3",
        "train.max_length=256", *overrides])


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_pairs")
    rows = build_pairs_rows(str(root / "world"), n_scenes=40, limit=32)
    long_row = dict(rows[0], id="too-long-prompt", prompt=LONG_PROMPT)
    return {"dir": write_pairs(rows + [long_row], str(root / "generated")), "n": len(rows) + 1}


@pytest.fixture(scope="module")
def reference_pairs(ray_cluster, tiny_models, pairs, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("reference"))
    run_reference(_cfg(tiny_models, "reference.batch_size=8"), pairs["dir"], out)
    return out


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, tiny_models, reference_pairs, tmp_path_factory) -> dict:
    """ZeRO-2, precomputed reference log-probs; stopped after 3 steps, then the same job again."""
    out = str(tmp_path_factory.mktemp("zero2"))
    first = run_training(_cfg(tiny_models, "train.zero_stage=2", "train.max_steps=3"), reference_pairs, out)
    second = run_training(_cfg(tiny_models, "train.zero_stage=2"), reference_pairs, out)
    return {"out": out, "first": first, "second": second}


@pytest.fixture(scope="module")
def zero3_run(ray_cluster, tiny_models, pairs, tmp_path_factory) -> dict:
    """ZeRO-3, reference = adapter off; worker 1 is killed at the start of step 5 (checkpoint at 3)."""
    out = str(tmp_path_factory.mktemp("zero3"))
    os.environ[FAIL_AT_STEP_ENV] = "5"
    try:
        result = run_training(_cfg(tiny_models, "train.zero_stage=3", "train.max_failures=1", "train.merge=true"),
                              pairs["dir"], out)
    finally:
        del os.environ[FAIL_AT_STEP_ENV]
    return {"out": out, "result": result}


def test_reference_pass_adds_log_probs_to_every_pair(reference_pairs, pairs):
    table = pq.read_table(os.path.join(reference_pairs, "pairs"))
    assert table.num_rows == pairs["n"]
    ids = table.column("id").to_pylist()
    chosen, rejected = table.column("ref_chosen_logp").to_pylist(), table.column("ref_rejected_logp").to_pylist()
    scored = [(c, r) for i, c, r in zip(ids, chosen, rejected) if i != "too-long-prompt"]
    assert all(c is not None and r is not None and c < 0 and r < 0 for c, r in scored)
    # the pair whose prompt cannot fit max_length keeps nulls and is counted, not lost
    assert chosen[ids.index("too-long-prompt")] is None
    manifest = read_manifest(os.path.join(reference_pairs, "manifest.json"))
    assert (manifest.counts.items_in, manifest.counts.paired, manifest.counts.filtered) == (pairs["n"], pairs["n"] - 1, 1)
    assert manifest.config["reference_settings"]["max_length"] == 256


def test_zero2_dpo_learns_and_resumes_when_submitted_again(zero2_run):
    first, second = zero2_run["first"], zero2_run["second"]
    assert first.steps == 3 and second.steps == 6
    assert first.reference == second.reference == "precomputed"
    attempts = records_by_attempt(zero2_run["out"])
    assert len(attempts) == 2
    assert attempts[0][0]["resumed_from_step"] is None and attempts[1][0]["resumed_from_step"] == 3
    assert [r["step"] for r in attempts[0][1:]] == [1, 2, 3]
    assert [r["step"] for r in attempts[1][1:]] == [4, 5, 6]  # continues, not from zero
    assert attempts[1][1]["samples_seen"] == 4 * 8  # data position restored: step 4 ends at 4 x 8 pairs
    # each worker loads only its rows of the epoch: 32 pairs, 2 workers x 4 a step -> rank 0 holds
    # 16; resumed at 24 of 32, it holds the 4 rows of the epoch's last step (then loads epoch 1's)
    assert (attempts[0][0]["pairs"], attempts[0][0]["share_rows"], attempts[1][0]["share_rows"]) == (32, 16, 4)
    records = read_metrics(os.path.join(zero2_run["out"], "metrics.jsonl"))
    assert all(r["ref_forwards"] == 0 for r in records)  # the reference forward never ran
    assert all(r["world_size"] == 2 for r in records)
    loss = [r["loss"] for r in records]
    acc = [r["reward_accuracy"] for r in records]
    assert loss[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2
    assert _mean(loss[-2:]) < _mean(loss[:2]) - 0.05
    assert _mean(acc[-2:]) > _mean(acc[:2]) + 0.25
    assert records[-1]["reward_margin"] > 0
    dropped = json.loads(storage.read_text(os.path.join(zero2_run["out"], "dropped_pairs.json")))
    assert dropped == {"prompt_too_long": ["too-long-prompt"]}


def test_pairs_checkpoints_and_adapter_on_s3_resume_when_submitted_again(ray_cluster, tiny_models, reference_pairs,
                                                                        s3_server, tmp_path):
    """Everything on the loopback S3 server: the workers read the pairs from s3://, Ray Train writes
    its checkpoints there, and the same job submitted again resumes from the S3 checkpoint."""
    from bpo_ray.train.export import load_with_adapter
    from bpo_ray.train.checkpoint import CHECKPOINTS_DIR

    pairs_uri = storage.join(s3_server["root"], "train-s3", "pairs-in")
    storage.upload_dir(reference_pairs, pairs_uri)
    out = storage.join(s3_server["root"], "train-s3", "out")
    first = run_training(_cfg(tiny_models, "train.zero_stage=2", "train.max_steps=3"), pairs_uri, out)
    checkpoints = storage.list_files(storage.join(out, CHECKPOINTS_DIR))
    assert first.steps == 3 and checkpoints, "the step-3 checkpoint is on S3"
    second = run_training(_cfg(tiny_models, "train.zero_stage=2"), pairs_uri, out)
    assert second.steps == 6 and second.reference == "precomputed"
    attempts = records_by_attempt(out)
    assert [a[0]["resumed_from_step"] for a in attempts] == [None, 3]
    assert [r["step"] for r in attempts[1][1:]] == [4, 5, 6]  # continues from the S3 checkpoint
    assert attempts[1][1]["samples_seen"] == 4 * 8
    assert second.adapter.startswith("s3://") and storage.exists(storage.join(out, "adapter", "adapter_config.json"))
    assert storage.exists(storage.join(out, "logps.png"))
    model, _ = load_with_adapter(tiny_models["mllm"], second.adapter, cache_dir=str(tmp_path / "cache"))
    assert any("lora_" in name for name, _ in model.named_parameters())


def test_out_the_cluster_cannot_write_fails_fast_with_a_clear_error(ray_cluster, tiny_models, reference_pairs,
                                                                     s3_server):
    """An output URI the workers cannot write (here a bucket that does not exist) is refused before
    Ray Train starts, naming the URI, instead of failing inside the train controller."""
    out = "s3://no-such-bucket-bpo/out"
    with pytest.raises(storage.StorageError, match="cluster's processes cannot write to s3://no-such-bucket-bpo/out"):
        run_training(_cfg(tiny_models, "train.zero_stage=2", "train.max_steps=1"), reference_pairs, out)


def test_zero3_worker_killed_resumes_from_checkpoint(zero3_run, zero2_run):
    out = zero3_run["out"]
    assert os.path.exists(os.path.join(out, ".injected-failure-step-5"))
    attempts = records_by_attempt(out)
    assert len(attempts) == 2, "the killed worker group was restarted once"
    assert [r["step"] for r in attempts[0][1:]] == [1, 2, 3, 4]
    assert attempts[1][0]["resumed_from_step"] == 3  # the last checkpoint, not step 0
    assert [r["step"] for r in attempts[1][1:]] == [4, 5, 6]
    # step 4 redone after the restart computes the same loss: weights, optimizer state and data
    # position all came back from the checkpoint
    assert attempts[1][1]["loss"] == pytest.approx(attempts[0][4]["loss"], abs=1e-6)
    assert attempts[1][1]["loss"] < attempts[0][1]["loss"] - 0.05
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert zero3_run["result"].reference == "adapter_disabled"
    assert all(r["ref_forwards"] > 0 for r in records)
    assert _mean(r["loss"] for r in records[-2:]) < _mean(r["loss"] for r in records[:2]) - 0.05
    # ZeRO-3 with the adapter-off reference matches ZeRO-2 with precomputed reference log-probs
    zero2 = read_metrics(os.path.join(zero2_run["out"], "metrics.jsonl"))
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in zero2], abs=1e-4)
    assert [r["ref_chosen_logp"] for r in records] == pytest.approx([r["ref_chosen_logp"] for r in zero2], abs=1e-3)


def test_outputs_layout_plot_and_merged_model(zero3_run, tiny_models):
    out = zero3_run["out"]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl",
                 "manifest.json", "checkpoints/checkpoint_manager_snapshot.json", "merged/config.json",
                 "train_data/train.parquet"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "logps.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    manifest = read_manifest(os.path.join(out, "manifest.json"))
    assert manifest.counts.items_in == 33 and manifest.counts.paired == 32 and manifest.counts.filtered == 1
    config = json.loads(open(os.path.join(out, "adapter", "adapter_config.json")).read())
    assert config["base_model_name_or_path"] == tiny_models["mllm"]
    assert all("language_model" in t for t in config["target_modules"])  # the vision tower stays frozen

    from bpo_ray.models.loading import load_mllm
    from bpo_ray.train.export import load_with_adapter

    tuned, proc = load_with_adapter(tiny_models["mllm"], os.path.join(out, "adapter"))
    merged, _ = load_mllm(os.path.join(out, "merged"), device="cpu")
    inputs = _inputs(proc)
    with torch.no_grad():
        assert torch.allclose(tuned(**inputs).logits, merged(**inputs).logits, atol=1e-4)


def _inputs(proc):
    from PIL import Image

    from bpo_ray.models.prompts import build_prompt

    image = Image.new("RGB", (32, 32), (220, 30, 30))
    return proc(images=image, text=build_prompt("What do you see in this picture? Describe it in detail."),
                return_tensors="pt")


@pytest.fixture(scope="module")
def sft_run(ray_cluster, tiny_models, pairs, tmp_path_factory) -> dict:
    """SFT with projector LoRA; first an elastic 1..2-worker run stopped after 2 steps, then the same
    job on 1 worker: a resize, so the adapter and data position carry over to a new world size."""
    out = str(tmp_path_factory.mktemp("sft"))
    common = ("train.mode=sft", "train.epochs=1", "train.lora.train_projector=true", "train.checkpoint_every=100")
    first = run_training(_cfg(tiny_models, *common, "train.num_workers=[1,2]", "train.max_steps=2"), pairs["dir"], out)
    second = run_training(_cfg(tiny_models, *common, "train.num_workers=1"), pairs["dir"], out)
    return {"out": out, "first": first, "second": second}


def test_sft_mode_trains_and_resumes_on_another_worker_count(sft_run):
    attempts = records_by_attempt(sft_run["out"])
    assert [a[0]["world_size"] for a in attempts] == [2, 1]
    assert attempts[1][0]["resumed_from_step"] == 2
    # the share follows the resize: 16 of 32 rows for rank 0 of 2, then the 16 left for the one worker
    assert [a[0]["share_rows"] for a in attempts] == [16, 16]
    assert [r["step"] for r in attempts[0][1:]] == [1, 2]
    # 32 pairs, one epoch: 2 steps x 8 on two workers, then 4 steps x 4 on one
    assert [(r["step"], r["samples_seen"]) for r in attempts[1][1:]] == [(3, 20), (4, 24), (5, 28), (6, 32)]
    records = read_metrics(os.path.join(sft_run["out"], "metrics.jsonl"))
    assert all(r["mode"] == "sft" for r in records) and "rejected_logp" not in records[0]
    # the adapter came back: the first step on one worker continues the fall instead of restarting
    assert attempts[1][1]["loss"] < attempts[0][1]["loss"] - 0.25
    assert _mean(r["loss"] for r in records[-2:]) < _mean(r["loss"] for r in records[:2]) - 0.25
    from safetensors import safe_open

    with safe_open(os.path.join(sft_run["out"], "adapter", "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("multi_modal_projector" in k for k in keys) and not any("vision_tower" in k for k in keys)


def test_adapter_loads_in_transformers_and_vllm(zero2_run, sft_run, tiny_models):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from bpo_ray.models.loading import load_mllm
    from bpo_ray.models.vllm_engine import make_llm
    from bpo_ray.train.export import load_with_adapter

    adapter = os.path.join(zero2_run["out"], "adapter")
    base, proc = load_mllm(tiny_models["mllm"], device="cpu")
    inputs = _inputs(proc)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        for path in (adapter, os.path.join(sft_run["out"], "adapter")):  # LM-only and LM+projector adapters
            tuned, _ = load_with_adapter(tiny_models["mllm"], path)
            assert (base_logits - tuned(**inputs).logits).abs().max() > 1e-2  # the adapter changes the model
    tuned, _ = load_with_adapter(tiny_models["mllm"], adapter)
    n_prompt = inputs["input_ids"].shape[1]
    hf_ids = tuned.generate(**inputs, max_new_tokens=12, do_sample=False)[0, n_prompt:]
    hf_text = proc.tokenizer.decode(hf_ids, skip_special_tokens=True)

    from PIL import Image

    from bpo_ray.models.prompts import build_prompt

    llm = make_llm(tiny_models["mllm"], max_model_len=512, enable_lora=True, max_lora_rank=16, max_loras=1)
    request = {"prompt": build_prompt("What do you see in this picture? Describe it in detail."),
               "multi_modal_data": {"image": Image.new("RGB", (32, 32), (220, 30, 30))}}
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    plain = llm.generate(request, params)[0].outputs[0]
    dpo = llm.generate(request, params, lora_request=LoRARequest("dpo", 1, adapter))[0].outputs[0]
    # vLLM's LoRA path and PEFT agree token for token (ids, not text: the two detokenizers treat a
    # trailing partial UTF-8 byte of a random-init model's output differently)
    assert list(dpo.token_ids) == hf_ids.tolist(), (dpo.text, hf_text)
    assert dpo.cumulative_logprob != pytest.approx(plain.cumulative_logprob, abs=1e-3)


@pytest.fixture(scope="module")
def validation_run(ray_cluster, tiny_models, pairs, tmp_path_factory) -> dict:
    """ZeRO-3, 2 workers, reference = adapter off, 9 pairs held out (shares of 5 and 4: worker 1 runs
    one throwaway batch, so both run the same collectives). 23 training pairs x 2 epochs / 8 per
    step = 5 steps; validated at 2, 4 and 5 (the last); a checkpoint at every step so each validated
    step's adapter can be compared. The best step is the one whose held-out chosen log-prob moved
    least. Here the held-out chosen log-prob fell 6.4 nats by step 2 and 8.1-8.2 by steps 4-5, so
    a 7-nat margin warns at some validations and not at others."""
    out = str(tmp_path_factory.mktemp("validation"))
    result = run_training(_cfg(tiny_models, "train.zero_stage=3", "train.epochs=2", "train.checkpoint_every=1",
                               "train.checkpoints_to_keep=10", "train.validation.n_pairs=9",
                               "train.validation.every_steps=2", "train.validation.metric=chosen_logp_delta",
                               "train.validation.chosen_drop_warn=7.0"), pairs["dir"], out)
    return {"out": out, "result": result}


@pytest.fixture(scope="module")
def collapse_stop_run(ray_cluster, tiny_models, pairs, tmp_path_factory) -> dict:
    """1 worker, ZeRO-2, a quarter of the pairs held out; a 3-nat stop margin stops the run at its
    first validation (step 2 of 6)."""
    out = str(tmp_path_factory.mktemp("validation_stop"))
    result = run_training(_cfg(tiny_models, "train.zero_stage=2", "train.num_workers=1", "train.per_device_batch_size=8",
                               "train.epochs=2", "train.validation.fraction=0.25", "train.validation.every_steps=2",
                               "train.validation.chosen_drop_warn=1.0", "train.validation.chosen_drop_stop=3.0"),
                          pairs["dir"], out)
    return {"out": out, "result": result}


def _adapter_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _checkpoint_adapter(out: str, step: int) -> str:
    from bpo_ray.train.checkpoint import CHECKPOINTS_DIR

    for name in sorted(os.listdir(os.path.join(out, CHECKPOINTS_DIR))):
        state = os.path.join(out, CHECKPOINTS_DIR, name, "state.json")
        if os.path.exists(state) and json.load(open(state))["step"] == step:
            return os.path.join(out, CHECKPOINTS_DIR, name, "adapter")
    raise AssertionError(f"no checkpoint of step {step}")


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_metrics_collapse_warning_and_best_adapter(validation_run):
    from bpo_ray.train.data import read_pairs

    out, result = validation_run["out"], validation_run["result"]
    assert result.steps == 5
    held_out = json.loads(open(os.path.join(out, "validation", "held_out_pairs.json")).read())
    trained = read_pairs(result.prepared.uri).take(result.prepared.keep).column("id").to_pylist()
    assert len(held_out) == 9 and len(trained) == 23 and set(held_out).isdisjoint(trained)
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    validated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validated] == [2, 4, 5]
    assert records_by_attempt(out)[0][0]["held_out_pairs"] == 9
    for r in validated:
        assert r["val_pairs"] == 9 and 0 <= r["val_reward_accuracy"] <= 1 and r["val_time_s"] > 0
        assert r["val_chosen_logp_delta"] == pytest.approx(r["val_chosen_logp"] - r["val_ref_chosen_logp"])
        assert r["val_collapse"] == (r["val_chosen_logp_delta"] < -7.0)  # exactly "fell past the margin"
    assert {r["val_collapse"] for r in validated} == {True, False}  # fired at some steps, not at others
    assert result.validation["collapse_steps"] == [r["step"] for r in validated if r["val_collapse"]]
    # the reference is the adapter switched off: the same held-out reference log-probs every time
    assert len({round(r["val_ref_chosen_logp"], 3) for r in validated}) == 1
    # the exported adapter is the best step's (chosen log-prob moved least); the last is kept too
    best = max(validated, key=lambda r: r["val_chosen_logp_delta"])
    summary = result.validation
    assert (summary["adapter"], summary["adapter_step"], summary["mode"], summary["last_step"]) == \
        ("best", best["step"], "max", 5)
    assert summary["adapter_metric_value"] == pytest.approx(best["val_chosen_logp_delta"])
    assert read_manifest(os.path.join(out, "manifest.json")).config["validation"] == summary
    assert records[-1]["val_best_step"] == best["step"]
    exported, last = _adapter_tensors(os.path.join(out, "adapter")), _adapter_tensors(os.path.join(out, "adapter_last"))
    assert _same_tensors(exported, _adapter_tensors(_checkpoint_adapter(out, best["step"])))
    assert _same_tensors(last, _adapter_tensors(_checkpoint_adapter(out, 5)))
    assert best["step"] != 5 and not _same_tensors(exported, last)
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [f"best-step-{best['step']:06d}", "best.json",
                                                                 "held_out_pairs.json"]
    manifest = read_manifest(os.path.join(out, "manifest.json"))
    assert manifest.counts.by_reason == {"prompt_too_long": 1, "held_out": 9} and manifest.counts.paired == 23


def test_validation_stops_a_collapsing_run(collapse_stop_run):
    out, result = collapse_stop_run["out"], collapse_stop_run["result"]
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2] and result.steps == 2  # of 6
    assert records[-1]["stopped"] == "collapse" and records[-1]["val_collapse"]
    assert records[-1]["val_chosen_logp_delta"] < -3.0 and records[-1]["val_pairs"] == 8
    assert result.validation["stopped_at_step"] == 2 and result.validation["adapter_step"] == 2
    # stopped with a checkpoint and an exported adapter, like a finished run
    assert _same_tensors(_adapter_tensors(os.path.join(out, "adapter")), _adapter_tensors(_checkpoint_adapter(out, 2)))
