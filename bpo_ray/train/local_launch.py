"""``train.launcher: local``: the training function in this process, without Ray.

The ``ray_train`` launcher starts Ray Train's controller, a placement group, four helper actors and
one process per worker, each importing torch and transformers again: some 10 s of fixed cost per
run on a 2-core machine, and Ray Train's imports (Ray Data, pandas: ~100 MB) in every worker. The
``local`` launcher calls the same training function (``loop.train_loop_per_worker``) here, as the
only worker of a world-size-1 process group, with a ``session.LocalSession`` in place of Ray
Train's context: the same data shares, model, LoRA, DeepSpeed engine and checkpoint layout, so the
same bits (``tests/test_train_local.py``). It does not get Ray Train's fault tolerance (restarts,
elastic resize) or its several workers; rerunning the command resumes from the latest checkpoint,
as a resubmitted ``ray_train`` job does. (Ray Train has a local mode of its own,
``ScalingConfig(num_workers=0)``; its reports keep checkpoints in memory only and it imports all
of Ray Train, so this launcher does not use it.)

``check_single_process`` refuses a multi-process launch (``torchrun``): several workers are the
``ray_train`` launcher's job. ``local_worker`` sets the process up as Ray Train sets up a one-worker
run: the world-size-1 ``gloo`` group (``nccl`` with CUDA) that DeepSpeed and the loop's
collectives use, the workers' environment, and one intra-op thread per reserved CPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

from bpo_ray.localcluster import free_port


class LauncherError(RuntimeError):
    """``train.launcher: local`` cannot run in this process as it is set up."""


def check_single_process() -> None:
    """Refuse a multi-process launch (``torchrun``'s ``WORLD_SIZE`` above 1) before any work."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise LauncherError(f"train.launcher=local runs one worker in this process, but WORLD_SIZE={world} (torchrun?): "
                           "for several workers use train.launcher=ray_train")


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch computes with ``threads`` intra-op threads within this context, as a Ray worker that
    reserves that many CPUs does (Ray sets its ``OMP_NUM_THREADS``); restored afterwards."""
    import torch

    from bpo_ray.numerics import set_threads

    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    set_threads(threads)
    try:
        yield
    finally:
        set_threads(before)


@contextlib.contextmanager
def local_worker(extra: Mapping[str, str] = (), threads: int = 1, use_gpu: bool = False) -> Iterator[dict[str, str]]:
    """Within this context this process is set up as a one-worker Ray Train run sets up its worker:

    - a one-process group on a free loopback port (``gloo``, ``nccl`` with ``use_gpu``), through
      torch's ``env://`` rendezvous variables, which DeepSpeed reads as well;
    - the variables the ``ray_train`` launcher gives its workers (``extra``; a value already
      exported wins);
    - torch computes with ``threads`` intra-op threads: a Ray Train worker has one per CPU it
      reserves (Ray sets its ``OMP_NUM_THREADS``; bpo-ray's workers reserve 1), and the thread
      count changes how CPU kernels split their sums, so with the same count both launchers train
      the same bits (``numerics.threads``, the world recipe's count, does not apply).

    Everything is restored afterwards and the process group destroyed. Yields the variables set."""
    import torch.distributed as dist

    check_single_process()
    if dist.is_initialized():
        raise LauncherError("train.launcher=local: this process already has a torch.distributed process group")
    wanted = {k: v for k, v in dict(extra).items() if k not in os.environ}
    wanted.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        dist.init_process_group("nccl" if use_gpu else "gloo", init_method="env://")
        with torch_threads(threads):
            yield wanted
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
