"""Image-weakened prompting (BPO section 3.1) as a Ray Data callable class.

The image goes through the vision tower and projector once; the post-projector features x_0 are
weakened by the diffusion forward step (DDPM Eq. 4 with VCD's schedule, ``bpo_ray.noise``)

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I)

and the MLLM answers from x_t in the prompt. Because x_t stays in the prompt (the KV cache), every
generated token is conditioned on the weakened image, unlike pixel noise that only the first
decode step sees. ``eps`` is drawn from a seed derived from (config seed, item id, t), so both
backends and every rerun see the very same noise.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from bpo_ray import numerics
from bpo_ray.config.generate import NoiseConfig, SamplingConfig
from bpo_ray.generate.backends import MLLMRunner, worker_env_defaults
from bpo_ray.generate.rows import decoded_batch, rows_by_group, sampling_record, with_column
from bpo_ray.generate.seeds import noise_seed, sampling_seed
from bpo_ray.noise import add_diffusion_noise

STRATEGY = "image_weakened"
COLUMN = f"neg_{STRATEGY}"


def weaken(features: torch.Tensor, item_ids: Sequence[str], step: int, base_seed: int,
           num_steps: int) -> torch.Tensor:
    """Noise each item's features ``(n, tokens, hidden)`` at ``step`` with its own derived seed."""
    rows = [add_diffusion_noise(features[i:i + 1], step, noise_seed(base_seed, item_ids[i], step), num_steps)
            for i in range(len(item_ids))]
    return torch.cat(rows, dim=0)


class ImageWeakenedSampler:
    """Adds ``neg_image_weakened``: one answer per configured noise step for every usable row."""

    def __init__(self, model_uri: str, backend: str, noise: dict, sampling: dict, seed: int,
                 dtype: str = "float32", device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models",
                 engine_kwargs: Optional[dict] = None, drop_image_bytes: bool = False, cpu_isa: str = "native"):
        numerics.check(cpu_isa, where="image-weakened sampler")
        worker_env_defaults()
        self.noise = NoiseConfig(**noise)
        self.sampling = SamplingConfig(**sampling)
        self.seed = int(seed)
        self.model_uri = model_uri
        self.drop = ("image_bytes",) if drop_image_bytes else ()
        self.runner = MLLMRunner(model_uri, backend=backend, dtype=dtype, device=device,
                                 cache_dir=cache_dir, engine_kwargs=engine_kwargs)
        self.provenance = sampling_record(backend, self.sampling, noise_schedule="vcd_sigmoid",
                                          noise_num_steps=self.noise.num_steps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images, rows, negatives = decoded_batch(batch)
        for group in rows_by_group(batch, rows):
            self._generate(batch, group, images, negatives)
        return with_column(batch, COLUMN, negatives, drop=self.drop)

    def _generate(self, batch, rows: list[int], images, negatives) -> None:
        prompts = [str(batch["llava_prompt"][i]) for i in rows]
        encoded = self.runner.encode([images[i] for i in rows], prompts)
        lengths = self.runner.prompt_lengths(encoded)
        fits = [k for k, n in enumerate(lengths) if n + self.sampling.max_new_tokens <= self.runner.max_len]
        for k in set(range(len(rows))) - set(fits):
            negatives[rows[k]] = [{"failed": "prompt_too_long"}]
        if not fits:
            return
        if len(fits) < len(rows):  # re-encode only what fits so padding stays minimal
            rows = [rows[k] for k in fits]
            prompts = [prompts[k] for k in fits]
            encoded = self.runner.encode([images[i] for i in rows], prompts)
        item_ids = [str(batch["item_id"][i]) for i in rows]
        clean = self.runner.features(encoded["pixel_values"])
        for step in self.noise.steps:
            noisy = weaken(clean, item_ids, step, self.seed, self.noise.num_steps)
            seeds = [sampling_seed(self.seed, STRATEGY, item_id, step) for item_id in item_ids]
            outs = self.runner.generate(prompts, encoded, noisy, self.sampling, seeds)
            for i, item_id, gen in zip(rows, item_ids, outs):
                negatives[i].append({
                    "text": gen.text, "noise_step": int(step),
                    "seed": noise_seed(self.seed, item_id, step),
                    "generator": self.model_uri, "sampling": self.provenance,
                })
