"""The learning-rate schedule of the train loop."""

from __future__ import annotations

import math


class WarmupCosine:
    """Linear warmup then cosine decay to 0, as a function of the fraction of samples seen.

    Driven by samples rather than steps so the schedule stays right when an elastic run resumes
    with a different number of workers (and so a different number of samples per step).
    """

    def __init__(self, peak_lr: float, warmup_ratio: float, total_samples: int):
        self.peak_lr, self.warmup_ratio, self.total = peak_lr, warmup_ratio, max(total_samples, 1)

    def lr_at(self, samples_done: int) -> float:
        progress = min(samples_done / self.total, 1.0)
        if progress < self.warmup_ratio:
            return self.peak_lr * progress / self.warmup_ratio
        span = max(1.0 - self.warmup_ratio, 1e-12)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * (progress - self.warmup_ratio) / span))

    def state_dict(self) -> dict:
        return {"kind": "warmup_cosine", "peak_lr": self.peak_lr, "warmup_ratio": self.warmup_ratio,
                "total_samples": self.total}
