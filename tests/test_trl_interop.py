"""Stock TRL trains on generate's output, on bpo-ray's tokens (issue #19, 2).

Real pieces only: generate runs on the session's Ray cluster with the tiny models, the pairs go
through ``bpo_ray.train.trl_format.to_trl_dataset``, and TRL 1.16's own ``DPOTrainer`` (its
default vision collator, its log-prob code) trains on them. The tests compare TRL's sequences
with ``encode_pair``'s token for token, and TRL's sequence log-probs with
``bpo_ray.train.logprobs.forward_logps``, before and after a few DPO steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from bpo_ray.config import load_config
from bpo_ray.images import load_image
from bpo_ray.train.data import read_pairs
from bpo_ray.train.logprobs import collate_pairs, encode_pair, forward_logps
from bpo_ray.train.trl_format import TRL_COLUMNS, to_trl_dataset, token_mismatch, trl_dpo_settings
from bpo_ray.world.build import build_world

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def generated(ray_cluster, tiny_models, tmp_path_factory) -> dict:
    from bpo_ray.generate.pipeline import run_generate

    world = tmp_path_factory.mktemp("trl_world")
    build_world(str(world), seed=0, n_scenes=30, corpus_lines=100)
    cfg = load_config("tiny", [f"models.mllm={tiny_models['mllm']}", f"models.text_llm={tiny_models['text_llm']}",
                               "generate.max_items=6", "generate.progress=false"])
    out = tmp_path_factory.mktemp("trl_generate")
    manifest = run_generate(cfg, str(world / "train.jsonl"), str(out))
    assert manifest.counts.pairs_written >= 4, manifest.counts
    return {"out": str(out), "cfg": cfg, "mllm": tiny_models["mllm"]}


@pytest.fixture(scope="module")
def processor(generated):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(generated["mllm"])


@pytest.fixture(scope="module")
def converted(generated, processor):
    return to_trl_dataset(generated["out"], processor.tokenizer)


def _examples(dataset, n: int) -> list[dict]:
    return [{k: dataset[i][k] for k in TRL_COLUMNS} for i in range(n)]  # the collator pops keys: fresh dicts


def _ours(generated, processor, ids: list[str]):
    rows = {r["id"]: r for r in read_pairs(generated["out"]).to_pylist()}
    max_length = generated["cfg"].train.max_length
    return [encode_pair(processor, load_image(rows[i]["image"])[0], rows[i]["prompt"], rows[i]["chosen"],
                        rows[i]["rejected"], max_length) for i in ids]


def test_every_pair_converts_and_is_accounted_for(generated, converted):
    pairs = read_pairs(generated["out"])
    assert converted.rows_in == pairs.num_rows
    assert converted.converted + sum(converted.dropped.values()) == converted.rows_in
    assert converted.converted == pairs.num_rows, converted.dropped  # the tiny tokenizer splits nothing differently
    assert set(converted.dataset["id"]) == set(pairs.column("id").to_pylist())
    assert type(converted.dataset.features["image"]).__name__ == "Image"


def test_trl_collator_builds_our_sequences_token_for_token(generated, processor, converted):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    n = converted.converted
    collator = DataCollatorForVisionPreference(processor=processor, max_length=generated["cfg"].train.max_length)
    batch = collator(_examples(converted.dataset, n))
    ours = _ours(generated, processor, converted.dataset["id"])
    for i, pair in enumerate(ours):
        for row, answer in ((i, pair.chosen_answer_ids), (n + i, pair.rejected_answer_ids)):
            keep = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][keep].tolist() == pair.prompt_ids + answer
            assert batch["completion_mask"][row][keep].tolist() == [0] * len(pair.prompt_ids) + [1] * len(answer)
        torch.testing.assert_close(batch["pixel_values"][i], pair.pixel_values[0])
    assert ours[0].prompt_ids[0] == processor.tokenizer.bos_token_id


def test_the_pairs_columns_as_they_are_give_other_tokens(generated, processor):
    """The control: the raw columns (what docs/generate.md used to promise TRL reads) differ."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    rows = read_pairs(generated["out"]).to_pylist()[:4]
    examples = [{"image": load_image(r["image"])[0], "prompt": r["prompt"], "chosen": r["chosen"],
                 "rejected": r["rejected"]} for r in rows]
    batch = DataCollatorForVisionPreference(processor=processor, max_length=256)(examples)
    ours = _ours(generated, processor, [r["id"] for r in rows])
    same = sum(batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() == p.prompt_ids + p.chosen_answer_ids
               for i, p in enumerate(ours))
    assert same == 0
    assert all(token_mismatch(processor.tokenizer, r["prompt"], r["chosen"], r["rejected"]) is None for r in rows)


def test_dpo_trainer_steps_with_our_sequence_logps(generated, processor, converted, tmp_path):
    from peft import LoraConfig
    from transformers import LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    from bpo_ray.train.lora import resolve_targets

    cfg = generated["cfg"]
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(generated["mllm"], dtype=torch.float32)
    targets = resolve_targets(model, cfg.train.lora)  # the layers bpo-ray adapts
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-3,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                     seed=0, gradient_checkpointing=False, **trl_dpo_settings(cfg.train))
    assert args.bf16 is False and args.max_length == cfg.train.max_length
    trainer = DPOTrainer(model=model, args=args, train_dataset=converted.dataset, processing_class=processor,
                         peft_config=LoraConfig(r=cfg.train.lora.rank, lora_alpha=cfg.train.lora.alpha,
                                                lora_dropout=0.0, target_modules=targets))
    n = min(4, converted.converted)
    batch = trainer.data_collator(_examples(converted.dataset, n))
    ours = collate_pairs(_ours(generated, processor, converted.dataset["id"][:n]), processor.tokenizer.pad_token_id)

    # TRL's reference log-probs (adapter disabled) = ours on the base model
    base = LlavaForConditionalGeneration.from_pretrained(generated["mllm"], dtype=torch.float32).eval()
    with torch.no_grad():
        ours_ref, _, _ = forward_logps(base, ours)
    trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    torch.testing.assert_close(trl_ref, ours_ref, atol=1e-5, rtol=1e-6)

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(2)) < 1e-3  # step 0: policy == reference (LoRA B starts at zero)

    # after the steps: TRL's policy log-probs (its fused-head forward) = ours on the trained model
    policy = trainer.model.eval()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model_inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        out = policy(**model_inputs, labels=labels, use_cache=False, fused_lm_head=True)
        trl_policy = out.log_probs[:, -(batch["completion_mask"].size(1) - 1):].sum(1)
        ours_policy, _, _ = forward_logps(policy, ours)
    torch.testing.assert_close(trl_policy, ours_policy, atol=1e-5, rtol=1e-6)
    assert (ours_policy - ours_ref).abs().max() > 1e-3  # the steps moved the policy


def test_trl_settings_refuse_what_has_no_checked_equal():
    from bpo_ray.config.train import TrainConfig

    assert trl_dpo_settings(TrainConfig(loss="conservative", label_smoothing=0.1))["label_smoothing"] == 0.1
    assert trl_dpo_settings(TrainConfig(loss="hinge"))["loss_type"] == ["hinge"]
    with pytest.raises(ValueError, match="train.loss=ipo, train.sft_weight=1.0"):
        trl_dpo_settings(TrainConfig(loss="ipo", sft_weight=1.0))


def test_trl_pairs_command_writes_the_dataset_and_its_account(generated, converted, tmp_path):
    import json

    import datasets

    from bpo_ray.cli import main

    out = tmp_path / "trl_pairs"
    assert main(["trl-pairs", "--pairs", generated["out"], "--out", str(out),
                 "--set", f"models.mllm={generated['mllm']}"]) == 0
    saved = datasets.load_from_disk(str(out))
    assert saved["id"] == converted.dataset["id"] and saved["chosen"] == converted.dataset["chosen"]
    account = json.loads((out / "trl_pairs.json").read_text())
    assert account["rows_in"] == converted.rows_in == account["converted"] + sum(account["dropped"].values())
    assert account["dpo_config"]["bf16"] is False
