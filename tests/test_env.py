"""Smoke test: the installed stack is the one the project needs, and it works."""

import torch

from bpo_ray.envcheck import check


def test_environment_is_not_broken():
    problems = check(quick=False)
    assert problems == [], "\n".join(problems)


def test_torch_is_cpu_build_without_cuda():
    if not torch.cuda.is_available():
        assert "+cpu" in torch.__version__
