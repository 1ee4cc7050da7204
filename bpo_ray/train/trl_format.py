"""Pairs as a dataset stock TRL trains on, on the very tokens bpo-ray trains on.

TRL 1.16's ``DPOTrainer`` handles a vision dataset with ``DataCollatorForVisionPreference``
(``trl/trainer/dpo_trainer.py``): it tokenizes ``prompt`` (image placeholder expanded by the
processor) and each completion separately, all with ``add_special_tokens=False``, and concatenates
them. Fed the pairs' columns as they are, that sequence has no BOS, no space after ``ASSISTANT:``
and no EOS, and the ``image`` column (a path string) is decoded by transformers through
torchvision, which the CPU stack cannot load. bpo-ray's sequence (``train.logprobs.encode_pair``)
is ``<s>`` + the LLaVA-1.5 prompt (``pair_prompt``) + `` answer`` + ``</s>``.

``to_trl_dataset`` writes what the collator needs to rebuild exactly that: ``prompt`` =
BOS + ``pair_prompt(prompt)``, ``chosen``/``rejected`` = `` `` + answer + EOS, and ``image`` as a
``datasets.Image(mode="RGB")`` column holding the image bytes (decoded by PIL, like
``bpo_ray.images``). Every row is checked token for token against ``encode_pair``'s split on the
tokenizer (the image placeholder is expanded identically on both sides); a row whose tokens would
differ is dropped and counted, never silently trained on other tokens.

``trl_dpo_settings(train)`` gives the ``DPOConfig`` values that make TRL score and weigh those
tokens as bpo-ray does: ``max_length`` (truncation ``keep_start``: TRL then cuts where
``encode_pair`` cuts, the end of the answer), ``beta``, the loss, and the precision. TRL's
``DPOConfig`` defaults to ``bf16=True`` (autocast, on CPU too), which moves sequence log-probs by
~1e-4 relative against bpo-ray's fp32.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from bpo_ray import storage
from bpo_ray.config.train import TrainConfig
from bpo_ray.models.prompts import pair_prompt
from bpo_ray.train.logprobs import answer_ids

#: The columns TRL's vision preference collator reads.
TRL_COLUMNS = ("image", "prompt", "chosen", "rejected")


@dataclass
class TrlPairs:
    """The TRL dataset plus the account of every input row: ``rows_in == converted + sum(dropped)``."""

    dataset: Any  # datasets.Dataset
    rows_in: int
    converted: int
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_ids: list[str] = field(default_factory=list)


def trl_texts(tokenizer, prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    """The ``prompt``/``chosen``/``rejected`` strings of one pair in TRL's format."""
    return {"prompt": tokenizer.bos_token + pair_prompt(prompt),
            "chosen": " " + chosen.strip() + tokenizer.eos_token,
            "rejected": " " + rejected.strip() + tokenizer.eos_token}


def ours_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` as ``encode_pair`` forms them, before image expansion."""
    text = pair_prompt(prompt)
    prompt_ids = tokenizer(text)["input_ids"]
    full = tokenizer(f"{text} {answer.strip()}")["input_ids"]
    return list(prompt_ids), answer_ids(list(full), list(prompt_ids), tokenizer, answer)


def trl_ids(tokenizer, texts: dict[str, str], which: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` as TRL's vision collator forms them, before image expansion."""
    prompt_ids = tokenizer(texts["prompt"], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(texts[which], add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(completion_ids)


def token_mismatch(tokenizer, prompt: str, chosen: str, rejected: str) -> Optional[str]:
    """None when TRL's tokens for this pair equal bpo-ray's, else which side differs."""
    texts = trl_texts(tokenizer, prompt, chosen, rejected)
    for which, answer in (("chosen", chosen), ("rejected", rejected)):
        if ours_ids(tokenizer, prompt, answer) != trl_ids(tokenizer, texts, which):
            return f"trl_tokens_differ_{which}"
    return None


def to_trl_dataset(pairs_uri: str, tokenizer) -> TrlPairs:
    """Read the pairs at ``pairs_uri`` (a stage output dir, a pairs dir or a Parquet file) and return
    them as a ``datasets.Dataset`` for ``trl.DPOTrainer`` with the model's processor.

    Columns: ``image`` (``datasets.Image``), ``prompt``, ``chosen``, ``rejected`` and the pair ``id``
    (TRL drops it: ``remove_unused_columns``). ``tokenizer`` is the processor's tokenizer.
    """
    import datasets

    from bpo_ray.train.data import read_pairs

    table = read_pairs(pairs_uri)
    rows: dict[str, list] = {name: [] for name in ("id", *TRL_COLUMNS)}
    dropped: Counter = Counter()
    dropped_ids: list[str] = []
    for row in table.select(["id", "image", "prompt", "chosen", "rejected"]).to_pylist():
        reason = token_mismatch(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        if reason is None:
            try:
                data = storage.read_bytes(row["image"])
            except storage.StorageError:
                reason = "missing_image"
        if reason is not None:
            dropped[reason] += 1
            dropped_ids.append(row["id"])
            continue
        texts = trl_texts(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        rows["id"].append(row["id"])
        rows["image"].append({"bytes": data, "path": row["image"]})
        for name in ("prompt", "chosen", "rejected"):
            rows[name].append(texts[name])
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(mode="RGB"),
                                  "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    return TrlPairs(dataset, rows_in=table.num_rows, converted=dataset.num_rows, dropped=dict(dropped),
                    dropped_ids=dropped_ids)


def trl_dpo_settings(train: TrainConfig) -> dict[str, Any]:
    """``trl.DPOConfig`` keyword arguments equal to bpo-ray's ``train`` section (TRL 1.16's
    ``DPOTrainer._compute_loss``): ``sigmoid`` is TRL's ``sigmoid``, ``conservative`` its ``sigmoid``
    with ``label_smoothing`` (cDPO), ``hinge`` its ``hinge``. Settings without a checked TRL
    equal (``ipo``: TRL's is length-normalised; ``average_logp``; ``sft_weight``) raise ValueError."""
    unmatched = []
    if train.mode != "dpo":
        unmatched.append(f"train.mode={train.mode} (use TRL's SFTTrainer)")
    if train.loss == "ipo":
        unmatched.append("train.loss=ipo")
    if train.average_logp:
        unmatched.append("train.average_logp=true")
    if train.sft_weight:
        unmatched.append(f"train.sft_weight={train.sft_weight}")
    if unmatched:
        raise ValueError("no TRL DPOConfig setting is checked to equal " + ", ".join(unmatched))
    return {"max_length": train.max_length, "truncation_mode": "keep_start", "beta": train.beta,
            "loss_type": ["hinge" if train.loss == "hinge" else "sigmoid"], "label_smoothing": train.label_smoothing,
            "bf16": train.precision == "bf16", "fp16": False}
