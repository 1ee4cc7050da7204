"""What the training function (``loop.train_loop_per_worker``) asks of whoever launched it: its
rank and world, its device, the checkpoint to resume from, and where its reports go.

- ``RaySession`` (``train.launcher: ray_train``): Ray Train's worker context. Reports go to the
  controller, which uploads each checkpoint to ``OUT/checkpoints/`` and hands a restarted worker
  group the latest one.
- ``LocalSession`` (``train.launcher: local``): this process is the only worker (rank 0 of a
  world-size-1 process group that ``local_launch.local_worker`` set up). It uploads checkpoints
  itself (``checkpoint.persist_checkpoint``: the same directory layout, the newest
  ``checkpoints_to_keep`` kept) and keeps the last metrics for the driver. A rerun finds the
  latest checkpoint in storage, as a resubmitted ``ray_train`` job does. It imports nothing of Ray.

Everything else (data shares, model, LoRA, DeepSpeed, steps, checkpoint contents) is the same
function either way, so both launchers train the same bits (``tests/test_train_local.py``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from bpo_ray.train.checkpoint import persist_checkpoint


class RaySession:
    """The training function inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_checkpoint(self) -> Any:
        """Ray Train's latest registered checkpoint (``.filesystem``, ``.path``), or None."""
        return self._train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None, step: int = 0) -> None:
        """Metrics to the controller, with this rank's part of a checkpoint (a local directory the
        controller's upload copies to ``OUT/checkpoints/``)."""
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """The training function in the launching process (``train.launcher: local``)."""

    def __init__(self, out_uri: str, checkpoints_to_keep: int, use_gpu: bool) -> None:
        self.rank, self.world = 0, 1
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu is set but this process sees no CUDA device")
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_gpu else torch.device("cpu")
        self.out_uri, self.keep = out_uri, checkpoints_to_keep
        self.last_metrics: dict = {}

    def latest_checkpoint(self) -> None:
        """Nothing registered beyond storage: ``checkpoint.resume_point`` looks there."""
        return None

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None, step: int = 0) -> None:
        if checkpoint_dir:
            persist_checkpoint(checkpoint_dir, self.out_uri, step, self.rank, self.keep)
        self.last_metrics = dict(metrics)
