"""Error injection (BPO section 3.1, Table 1): the text LLM rewrites the ground truth with errors.

The LLM component of the MLLM gets the paper's few-shot prompt (Table 1, verbatim) filled with
the item's question and ground-truth answer, and samples a "modified response" that changes
object existence, attributes or counts while staying common in reality. Reference code samples
at temperature 0.8, top_p 0.95 (the config default).

Two backends: ``ErrorInjector`` (transformers, a Ray Data callable class) and
``error_injection_processor`` (vLLM through ``ray.data.llm.build_processor``; text-only prompts
with per-row sampling params fit it exactly).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Optional, Sequence

import numpy as np
import torch

from bpo_ray import numerics
from bpo_ray.config.generate import PoolConfig, SamplingConfig
from bpo_ray.generate.backends import batch_seed, cpu_engine_defaults, trim_ids
from bpo_ray.generate.rows import ok_indices, rows_by_group, sampling_record, with_column
from bpo_ray.models.vllm_engine import cpu_kv_cache_env
from bpo_ray.generate.seeds import sampling_seed
from bpo_ray.models.prompts import text_prompt

STRATEGY = "error_injection"
COLUMN = f"neg_{STRATEGY}"

#: Table 1 of Pi et al. 2024 (BPO), verbatim, including its typos and the knife example whose
#: modified response is empty in the paper. ``New Question`` / ``New Response`` are the slots.
ERROR_INJECTION_PROMPT = (
    "I will give you a question and a response about an image. Pretend that you can see the image. "
    "You must modify the response by changing the original details, such as adding more objects or "
    "change the attributes of objects. Note that the modified responses should still be common in "
    "reality. I will give you some examples, then you need to paraphrase the new response. Examples: "
    "Question: Describe the image. Response: the image shows an old man walking across the street. "
    "There are many people on the sidewalks, and cars are running on the street. Modified response: "
    "the image shows a woman running towards a car, there are no cars on the street. Question: What "
    "is the color of the apple? Response: the color of the apple is black. Modified response: the "
    "color of the apple is yellow. Question: What is on the left side of the boy? Response: there is "
    "a dog left to the boy. Modified response: it is a cat on the left of the boy. Question: How many "
    "people are there? Response: there are 3 people in the image. Modified response: there are only 1 "
    "person in the image. Question: what is the price of the knife? Response: The price shown in the "
    "image is 3 dollors. Modified response: Question: Describe the image in detail. Response: The "
    "image is a close-up of a wristwatch with a circular face and a black leather strap. The watch has "
    "a silver-colored bezel and case, and features a white dial with black Arabic numerals indicating "
    "the hours from 1 to 12. The hands of the watch are not visible\u2026. Modified response: The image "
    "is a close-up of a wristwatch with a rectangular face and a brown leather strap. The watch has a "
    "gold-colored bezel and case, and features a black dial with white Roman numerals indicating the "
    "hours from 1 to 12. The hands of the watch are pointing towards the 3 o\u2019clock position\u2026 "
    "Question: New Question Response: New Response Modified Response:"
)
_SLOTS = "Question: New Question Response: New Response Modified Response:"
_LABEL = re.compile(r"^\s*(modified\s+response\s*:\s*)+", re.I)
_STOP = re.compile(r"(\n\s*\n|\bQuestion:|\bResponse:|\bUSER:|\bASSISTANT:|</s>)")


def injection_prompt(question: str, answer: str) -> str:
    """The chat-formatted text-LLM prompt for one item (Table 1 with the slots filled)."""
    head = ERROR_INJECTION_PROMPT[: -len(_SLOTS)]
    return text_prompt(f"{head}Question: {question.strip()} Response: {answer.strip()} Modified Response:")


def clean_injected(text: str) -> str:
    """The modified response alone: drop an echoed label and anything after the next example."""
    text = _LABEL.sub("", text.strip())
    m = _STOP.search(text)
    return (text[: m.start()] if m else text).strip()


@functools.lru_cache(maxsize=4)
def _tokenizer(model_uri: str, cache_dir: str):
    from transformers import AutoTokenizer

    from bpo_ray.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(model_uri, cache_dir))


def _negative(text: str, seed: int, model_uri: str, provenance: dict) -> dict[str, Any]:
    return {"text": clean_injected(text), "raw_text": text, "noise_step": None, "seed": seed,
            "generator": model_uri, "sampling": provenance}


class ErrorInjector:
    """Transformers backend: adds ``neg_error_injection`` (one sampled rewrite per usable row)."""

    def __init__(self, model_uri: str, sampling: dict, seed: int, dtype: str = "float32",
                 device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models", cpu_isa: str = "native"):
        from bpo_ray.models.loading import load_text_lm

        numerics.check(cpu_isa, where="error injector")
        self.model_uri = model_uri
        self.sampling = SamplingConfig(**sampling)
        self.seed = int(seed)
        self.model, self.tokenizer = load_text_lm(model_uri, dtype=dtype, device=device, cache_dir=cache_dir)
        self.tokenizer.padding_side = "left"
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 4096))
        self.provenance = sampling_record("transformers", self.sampling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        negatives: list[list[dict]] = [[] for _ in range(len(batch["order"]))]
        rows = ok_indices(batch)
        prompts = [injection_prompt(str(batch["question"][i]), str(batch["answer"][i])) for i in rows]
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]] if rows else []
        keep = []
        for i, p, n in zip(rows, prompts, lengths):
            if n + self.sampling.max_new_tokens > self.max_len:
                negatives[i] = [{"failed": "prompt_too_long"}]
            else:
                keep.append((i, p))
        prompt_of = dict(keep)
        for group in rows_by_group(batch, [i for i, _ in keep]):
            seeds = [sampling_seed(self.seed, STRATEGY, str(batch["item_id"][i])) for i in group]
            texts = self.generate([prompt_of[i] for i in group], seeds)
            for i, seed, text in zip(group, seeds, texts):
                negatives[i] = [_negative(text, seed, self.model_uri, self.provenance)]
        return with_column(batch, COLUMN, negatives)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.model.device)
        kwargs: dict[str, Any] = dict(max_new_tokens=self.sampling.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if self.sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.sampling.temperature, top_p=self.sampling.top_p, top_k=None)
            torch.manual_seed(batch_seed(seeds))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        return [self.tokenizer.decode(list(trim_ids(row.tolist(), eos, pad)), skip_special_tokens=True) for row in out]


def _merge_env(*envs: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    merged: dict[str, str] = {}
    for env in envs:
        merged.update((env or {}).get("env_vars", {}))
    return {"env_vars": merged} if merged else None


def _max_model_len(engine_kwargs: dict[str, Any]) -> int:
    return int(engine_kwargs.get("max_model_len", 1024))


def error_injection_processor(model_uri: str, model_path: str, sampling: SamplingConfig, seed: int,
                              pool: PoolConfig, keep_columns: Sequence[str], engine_kwargs: dict[str, Any],
                              cache_dir: str = "~/.cache/bpo-ray/models", io_num_cpus: float = 0.25,
                              runtime_env: Optional[dict[str, Any]] = None):
    """vLLM backend: a ``ray.data.llm`` processor mapping item rows to rows with ``neg_error_injection``.

    Quarantined and over-long rows still flow through (as a one-token placeholder request) so
    every row keeps its place in the shard accounting.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from bpo_ray.models.vllm_engine import engine_defaults

    engine = {"max_model_len": 1024, "seed": 0, **engine_defaults(), **cpu_engine_defaults(), **engine_kwargs}
    max_len = _max_model_len(engine)
    bundle: dict[str, float] = {"CPU": max(pool.num_cpus, 0.01)}
    if pool.num_gpus > 0:
        bundle["GPU"] = pool.num_gpus
    provenance = sampling_record("vllm", sampling)
    keep = list(keep_columns)
    placeholder = text_prompt("")

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        usable = row["status"] == "ok"
        prompt = injection_prompt(str(row["question"]), str(row["answer"])) if usable else placeholder
        failed = ""
        if usable and len(_tokenizer(model_uri, cache_dir)(prompt)["input_ids"]) + sampling.max_new_tokens > max_len:
            failed, prompt = "prompt_too_long", placeholder
        s = sampling_seed(seed, STRATEGY, str(row["item_id"]))
        work = usable and not failed
        params = {"max_tokens": sampling.max_new_tokens if work else 1, "temperature": sampling.temperature,
                  "top_p": sampling.top_p if sampling.temperature > 0 else 1.0}
        if sampling.temperature > 0:
            params["seed"] = s
        return {**{k: row[k] for k in keep}, "prompt": prompt, "sampling_params": params,
                "ei_failed": failed, "ei_seed": s}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: row[k] for k in keep}
        if row["status"] != "ok":
            negs: list[dict] = []
        elif row["ei_failed"]:
            negs = [{"failed": row["ei_failed"]}]
        else:
            tok = _tokenizer(model_uri, cache_dir)
            ids = trim_ids(list(row["generated_tokens"]), tok.eos_token_id, tok.pad_token_id)
            text = tok.decode(list(ids), skip_special_tokens=True)
            negs = [_negative(text, int(row["ei_seed"]), model_uri, provenance)]
        out[COLUMN] = json.dumps(negs)
        return out

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine,
        batch_size=pool.batch_size,
        concurrency=(pool.min_size, pool.max_size) if pool.max_size > pool.min_size else pool.min_size,
        placement_group_config={"bundles": [bundle]},
        accelerator_type=None,
        chat_template_stage={"enabled": False},
        tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False},
        log_engine_metrics=False,
        runtime_env=_merge_env(runtime_env, cpu_kv_cache_env()),
    )
    return build_processor(config, preprocess=preprocess, postprocess=postprocess,
                           preprocess_map_kwargs={"num_cpus": io_num_cpus},
                           postprocess_map_kwargs={"num_cpus": io_num_cpus})
