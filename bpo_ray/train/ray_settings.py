"""Settings of Ray Train's controller that bpo-ray chooses (Ray 2.60's Train V2), and the one
helper actor it starts early.

Ray Train reads them from the driver's environment when ``TorchTrainer.fit`` starts its
controller (``ray.train.v2._internal.constants.get_env_vars_to_propagate``) and passes them on
to the controller and the workers; ``controller_settings`` sets them for the duration of ``fit``
only, and never overrides a value the user exported.

``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s) is how often the controller polls the
workers, and also how long each poll may take before it is counted as missed (a worker is only
declared dead after ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S``, 10 minutes). A run's end is seen
on the second poll after the training function returns (the first one collects its last report),
so Ray's default adds 2-4 s to every run; a worker's ``ray.train.report`` with a checkpoint
waits for the controller to collect the previous one. A poll is one small actor call per worker.

Before it starts the worker group, the controller registers its resources with Ray's
AutoscalingCoordinator, a detached actor on the driver's node that Ray Train and Ray Data share,
and waits for the answer (up to 5 s): on a Ray instance that has not run a Train or Data job yet,
that is the actor's process start. ``start_autoscaling_coordinator`` asks for it just before
``fit`` (Ray's own ``get_or_create``, same name and options, not waiting), so it starts while the
controller's process starts.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def controller_settings(poll_interval_s: float) -> Iterator[None]:
    """Within this context, a ``fit`` starts its controller polling every ``poll_interval_s``
    (unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is already set in the environment)."""
    if POLL_INTERVAL_ENV in os.environ:
        yield
        return
    os.environ[POLL_INTERVAL_ENV] = repr(float(poll_interval_s))
    try:
        yield
    finally:
        os.environ.pop(POLL_INTERVAL_ENV, None)


def start_autoscaling_coordinator() -> None:
    """Have Ray start its AutoscalingCoordinator actor now (a no-op where it runs already, or where
    this Ray has no such function)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()
