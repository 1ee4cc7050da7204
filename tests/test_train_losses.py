"""Train stage, fast tier: losses, answer-token log-probs, batching, schedule, data order, ZeRO
configs. Every expected number is worked out by hand in the comments (math module only)."""

from __future__ import annotations

import math

import pytest
import torch

from bpo_ray.config import load_config
from bpo_ray.models.prompts import build_prompt
from bpo_ray.train.data import DataPosition, epoch_order
from bpo_ray.train.logprobs import (
    EncodedPair,
    PromptTooLong,
    collate_pairs,
    encode_pair,
    forward_logps,
    sequence_logps,
    token_logps,
)
from bpo_ray.models.prompts import pair_prompt as format_prompt
from bpo_ray.train.schedule import WarmupCosine
from bpo_ray.train.losses import PreferenceLoss, dpo_with_sft, sft_loss
from bpo_ray.train.zero import fill_deepspeed_config, load_deepspeed_template

# One pair used throughout: policy log-probs chosen -1.0, rejected -2.0; reference -1.5 for both.
# h = (-1.0 - -1.5) - (-2.0 - -1.5) = 0.5 + 0.5 = 1.0
PI_W, PI_L, REF_W, REF_L = -1.0, -2.0, -1.5, -1.5


def _loss(kind: str, beta: float, eps: float = 0.0):
    t = lambda v: torch.tensor([v], dtype=torch.float64, requires_grad=True)  # noqa: E731
    pw, pl = t(PI_W), t(PI_L)
    out = PreferenceLoss(kind, beta, eps)(pw, pl, t(REF_W), t(REF_L))
    return out, pw, pl


def test_dpo_sigmoid_matches_eq4_by_hand():
    out, pw, pl = _loss("sigmoid", beta=0.5)
    # -log sigma(0.5 * 1.0) = log(1 + e^-0.5) = 0.4740769841801067
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.4740769841801067, abs=1e-12)
    # implicit rewards beta * (pi - ref): 0.5 * 0.5 = 0.25 and 0.5 * -0.5 = -0.25
    assert out.chosen_rewards.item() == pytest.approx(0.25)
    assert out.rejected_rewards.item() == pytest.approx(-0.25)
    out.losses.sum().backward()
    # d/dpi_w of -log sigma(beta h) = -beta * sigma(-beta h) = -0.5 * 0.3775406687981454
    assert pw.grad.item() == pytest.approx(-0.5 / (1 + math.exp(0.5)), abs=1e-12)
    assert pl.grad.item() == pytest.approx(+0.5 / (1 + math.exp(0.5)), abs=1e-12)


def test_conservative_dpo_by_hand():
    out, _, _ = _loss("conservative", beta=0.5, eps=0.1)
    # 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.9 * 0.474077 + 0.1 * 0.974077 = 0.5240770
    expected = 0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5))
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.524076984, abs=1e-8)


def test_ipo_and_hinge_by_hand():
    ipo, _, _ = _loss("ipo", beta=0.25)
    # (h - 1/(2 beta))^2 = (1 - 2)^2 = 1
    assert ipo.losses.item() == pytest.approx(1.0)
    hinge, _, _ = _loss("hinge", beta=0.5)
    # max(0, 1 - 0.5 * 1) = 0.5
    assert hinge.losses.item() == pytest.approx(0.5)
    hinge_sat, _, _ = _loss("hinge", beta=2.0)
    # max(0, 1 - 2 * 1) = 0: a pair past the margin contributes nothing
    assert hinge_sat.losses.item() == 0.0


def test_policy_equal_to_reference_gives_log2():
    z = torch.zeros(3)
    out = PreferenceLoss("sigmoid", 0.1)(z - 5, z - 7, z - 5, z - 7)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2)))


@pytest.mark.parametrize("kwargs,needle", [
    ({"loss_type": "sigmoid", "beta": 0.0}, "beta must be > 0"),
    ({"loss_type": "sigmoid", "beta": -1.0}, "beta must be > 0"),
    ({"loss_type": "dpo++", "beta": 0.1}, "unknown loss"),
    ({"loss_type": "conservative", "beta": 0.1}, "label_smoothing in"),
    ({"loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.1}, "applies to 'conservative' only"),
])
def test_bad_loss_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PreferenceLoss(**kwargs)


def test_token_logps_mask_prompt_and_average():
    # vocab 2; logits [0, ln 3] everywhere -> p(token 0) = 1/4, p(token 1) = 3/4
    logits = torch.tensor([[[0.0, math.log(3)]] * 4])
    input_ids = torch.tensor([[0, 1, 0, 1]])
    answer_mask = torch.tensor([[0, 0, 1, 1]])  # tokens 2 and 3 are the answer
    logps, mask = token_logps(logits, input_ids, answer_mask)
    # targets are tokens 1..3 = [1, 0, 1]; only the last two count: log(1/4) + log(3/4)
    assert mask.tolist() == [[0, 1, 1]]
    assert logps[0, 0].item() == 0.0
    total = sequence_logps(logps, mask)
    assert total.item() == pytest.approx(math.log(0.25) + math.log(0.75), abs=1e-6)
    assert sequence_logps(logps, mask, average=True).item() == pytest.approx((math.log(0.25) + math.log(0.75)) / 2, abs=1e-6)


def test_sft_loss_is_mean_nll_over_answer_tokens():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 3) / 3 tokens = 2
    assert sft_loss(logps, mask).item() == pytest.approx(2.0)


def _pair(prompt_len: int, chosen: list[int], rejected: list[int], fill: float) -> EncodedPair:
    return EncodedPair(list(range(10, 10 + prompt_len)), chosen, rejected, torch.full((1, 3, 2, 2), fill))


def test_collate_puts_chosen_then_rejected_with_images_repeated():
    a = _pair(3, [1, 2], [5], fill=1.0)
    b = _pair(2, [7], [8, 9, 2], fill=2.0)
    batch = collate_pairs([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 1, 2],   # a chosen
        [10, 11, 7, 0, 0],    # b chosen, right-padded
        [10, 11, 12, 5, 0],   # a rejected
        [10, 11, 8, 9, 2],    # b rejected
    ]
    assert batch["answer_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 4, 5]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    sft = collate_pairs([a, b], pad_token_id=0, with_rejected=False)
    assert sft["input_ids"].shape[0] == 2


def test_format_prompt_wraps_questions_and_keeps_full_prompts():
    assert format_prompt("What is here?") == build_prompt("What is here?")
    assert format_prompt("<image>\nWhat is here?") == build_prompt("What is here?")
    full = "USER: <image>\nHi ASSISTANT: Hello</s>USER: And? ASSISTANT:"
    assert format_prompt(full) == full
    assert format_prompt("USER: Hi ASSISTANT:") == "USER: <image>\nHi ASSISTANT:"


@pytest.fixture(scope="module")
def tiny_llava(tiny_models):
    from bpo_ray.models.loading import load_mllm

    return load_mllm(tiny_models["mllm"], device="cpu")


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype("uint8"))


def test_encode_pair_truncates_answers_never_image_tokens(tiny_llava):
    _, proc = tiny_llava
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    eos = proc.tokenizer.eos_token_id
    full = encode_pair(proc, _image(), "Describe the image.", "There is a red cup on the left.", "No.", max_length=256)
    assert full.prompt_ids.count(image_id) == 16  # 32px / patch 8 -> 4x4 image tokens, all kept
    assert full.chosen_answer_ids[-1] == eos and full.rejected_answer_ids[-1] == eos
    decoded = proc.tokenizer.decode(full.chosen_answer_ids, skip_special_tokens=True)
    assert decoded.strip() == "There is a red cup on the left."
    n_prompt = len(full.prompt_ids)
    cut = encode_pair(proc, _image(), "Describe the image.", "There is a red cup on the left.", "No.", max_length=n_prompt + 3)
    assert cut.prompt_ids == full.prompt_ids
    assert cut.chosen_answer_ids == full.chosen_answer_ids[:3]  # the answer's end is what goes
    assert len(cut.prompt_ids) + len(cut.chosen_answer_ids) == n_prompt + 3
    with pytest.raises(PromptTooLong, match="image tokens included"):
        encode_pair(proc, _image(), "Describe the image.", "Yes.", "No.", max_length=n_prompt)


def _two_pairs_forward(model, proc, chosen: str, rejected: str):
    """A caption pair and an existence pair (answers ``chosen``/``rejected``) through one
    concatenated forward: ``(pairs, sequence_logps, token_logps, answer_mask)``."""
    pairs = [encode_pair(proc, _image(), "What is here?", "A red cup.", "A blue dog and a leash.", 256),
             encode_pair(proc, _image(), "Is there a cup?", chosen, rejected, 256)]
    batch = collate_pairs(pairs, proc.tokenizer.pad_token_id)
    with torch.no_grad():
        return (pairs, *forward_logps(model, batch, average=False, device=torch.device("cpu")))


def test_model_loss_matches_a_hand_computation(tiny_llava):
    """DPO loss from the batched, concatenated forward equals a per-sequence, per-token
    computation written out separately (log-softmax at each answer position, then Eq. 4)."""
    model, proc = tiny_llava
    pairs, seq, _, _ = _two_pairs_forward(model, proc, "Yes.", "No.")

    def by_hand(prompt_ids, answer_ids, pixel_values):
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixel_values).logits[0]
        total = 0.0
        for pos in range(len(prompt_ids), len(prompt_ids) + len(answer_ids)):
            row = logits[pos - 1].double()
            total += (row[ids[0, pos]] - torch.logsumexp(row, 0)).item()
        return total

    hand = [by_hand(p.prompt_ids, p.chosen_answer_ids, p.pixel_values) for p in pairs] + \
           [by_hand(p.prompt_ids, p.rejected_answer_ids, p.pixel_values) for p in pairs]
    assert seq.tolist() == pytest.approx(hand, abs=1e-3)
    # reference = policy shifted by known amounts: loss_i = -log sigma(beta * (d_w - d_l))
    beta, d_w, d_l = 0.1, torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 3.0])
    out = PreferenceLoss("sigmoid", beta)(seq[:2], seq[2:], seq[:2] - d_w, seq[2:] - d_l)
    # pair 0: h = 2 - (-1) = 3 -> log(1 + e^-0.3) = 0.5543552; pair 1: h = -1 - 3 = -4 -> log(1 + e^0.4) = 0.9130153
    assert out.losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.3)), math.log(1 + math.exp(0.4))], abs=1e-5)


def test_sft_weight_adds_the_chosen_answers_nll_only(tiny_llava):
    """DPO + w * NLL (RPO): the NLL is over the chosen rows' answer tokens, never the rejected."""
    model, proc = tiny_llava
    pairs, seq, tok, mask = _two_pairs_forward(model, proc, "The cup yes.", "The cup no.")
    dpo = PreferenceLoss("sigmoid", 0.1)(seq[:2], seq[2:], seq[:2] - 1.0, seq[2:] + 1.0).losses
    plain, none = dpo_with_sft(dpo, tok, mask, 0.0)
    assert none is None and plain.item() == pytest.approx(dpo.mean().item())
    loss, nll = dpo_with_sft(dpo, tok, mask, 0.5)
    n_chosen_tokens = sum(len(p.chosen_answer_ids) for p in pairs)
    assert nll.item() == pytest.approx(-seq[:2].sum().item() / n_chosen_tokens, abs=1e-4)
    assert loss.item() == pytest.approx(dpo.mean().item() + 0.5 * nll.item(), abs=1e-5)


def test_warmup_cosine_schedule_by_hand():
    s = WarmupCosine(peak_lr=1.0, warmup_ratio=0.1, total_samples=100)
    assert s.lr_at(5) == pytest.approx(0.5)     # halfway through warmup
    assert s.lr_at(10) == pytest.approx(1.0)    # peak
    assert s.lr_at(55) == pytest.approx(0.5)    # cos(pi/2) = 0 -> 0.5 * (1 + 0)
    assert s.lr_at(100) == pytest.approx(0.0)   # cos(pi) = -1


def test_data_position_resumes_exactly_and_wraps_epochs():
    run = DataPosition()
    first = [run.take(10, 4, seed=3).tolist() for _ in range(5)]
    # epoch 0 gives 2 batches of 4 (8 of 10 rows), then epoch 1 starts
    assert run.epoch == 2 and run.samples_seen == 20
    assert sorted(first[0] + first[1]) == sorted(epoch_order(10, 3, 0)[:8].tolist())
    resumed = DataPosition(epoch=0, offset=8, samples_seen=8)  # as saved after two batches
    assert [resumed.take(10, 4, seed=3).tolist() for _ in range(3)] == first[2:]
    assert epoch_order(10, 3, 0).tolist() != epoch_order(10, 3, 1).tolist()
    assert epoch_order(10, 3, 0).tolist() == epoch_order(10, 3, 0).tolist()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_fill_autos(stage):
    train = load_config("tiny", [f"train.zero_stage={stage}", "train.grad_accum=2"]).train
    cfg = fill_deepspeed_config(load_deepspeed_template(train), train, world_size=3)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == train.per_device_batch_size
    assert cfg["train_batch_size"] == train.per_device_batch_size * 2 * 3
    assert cfg["bf16"]["enabled"] is False
    assert "auto" not in str(cfg)


def test_latest_complete_checkpoint_skips_partial_uploads(tmp_path):
    from bpo_ray.train.data import DataPosition
    from bpo_ray.train.checkpoint import TrainState, latest_complete_checkpoint

    def checkpoint(name: str, step: int, world: int, shards: int, adapter: bool = True) -> None:
        d = tmp_path / "checkpoints" / name
        (d / "deepspeed" / "state").mkdir(parents=True)
        (d / "state.json").write_text(TrainState(step=step, position=DataPosition(), world_size=world).to_json())
        for r in range(shards):
            (d / "deepspeed" / "state" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
        if adapter:
            (d / "adapter").mkdir()
            (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x")

    assert latest_complete_checkpoint(str(tmp_path)) is None
    checkpoint("checkpoint_a", step=3, world=2, shards=2)
    checkpoint("checkpoint_b", step=6, world=2, shards=1)                 # rank 1's shard never arrived
    checkpoint("checkpoint_c", step=9, world=1, shards=1, adapter=False)  # adapter missing
    assert latest_complete_checkpoint(str(tmp_path)) == (3, str(tmp_path / "checkpoints" / "checkpoint_a"))
    checkpoint("checkpoint_d", step=5, world=1, shards=1)
    assert latest_complete_checkpoint(str(tmp_path))[0] == 5
