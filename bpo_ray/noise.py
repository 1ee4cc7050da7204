"""Image weakening by the diffusion forward process on image embeddings (BPO section 3.1).

BPO weakens the image by "a gaussian mask on the image embeddings ... analogous to the forward
process of diffusion models" (Pi et al. 2024, section 3.1, citing DDPM). We use VCD's schedule
(Leng et al. 2023, which BPO cites): T = 1000,
``beta_t = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5``, ``alpha_bar_t = prod(1 - beta)``,
and the closed-form forward step (DDPM Eq. 4):

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,   eps ~ N(0, I)

Noise is drawn on the CPU from a seeded generator, so the same seed gives the same noise on every
backend and device.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def alphas_cumprod(num_steps: int = 1000) -> torch.Tensor:
    """``alpha_bar_t`` for t = 0..T-1 (float64, CPU)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise of ``shape`` from a CPU generator seeded with ``seed`` (float32)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def add_diffusion_noise(x0: torch.Tensor, step: int, seed: int, num_steps: int = 1000) -> torch.Tensor:
    """Return ``x_t`` for clean embeddings ``x0`` at diffusion step ``step`` (0 <= step < T).

    ``x0`` has any shape, e.g. ``(n_images, n_image_tokens, lm_hidden)`` post-projector features;
    the result has its shape, dtype and device.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"noise step {step} outside [0, {num_steps})")
    abar = alphas_cumprod(num_steps)[step]
    eps = seeded_noise(tuple(x0.shape), seed).to(device=x0.device, dtype=torch.float32)
    xt = abar.sqrt().item() * x0.float() + (1.0 - abar).sqrt().item() * eps
    return xt.to(x0.dtype)


def signal_fraction(step: int, num_steps: int = 1000) -> float:
    """``sqrt(alpha_bar_t)``: how much of the clean embedding survives at ``step``."""
    return float(alphas_cumprod(num_steps)[step].sqrt())
