"""Portable CPU numerics: pinned kernels everywhere a stage computes, the same bits however it runs.

The machine kind's CPUs differ (AVX2 or AVX-512); ``numerics.cpu_isa: avx2`` makes each process
use the AVX2 kernels. These tests run real processes: a fresh interpreter pinned before torch is
imported, one pinned by the CLI's early pass, and a Ray worker given the stage runtime env, and
compare the weights of the same small training run by sha256.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bpo_ray import numerics
from bpo_ray.config.shared import NumericsConfig
from conftest import REPO, python_last_line

# A stage process: numerics.check (kernels, VML dispatch, threads), then a small 2-thread training run.
TRAIN_SNIPPET = """
import hashlib, torch
from bpo_ray import numerics
numerics.check("avx2", threads=2, where="the snippet")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256), torch.nn.Linear(256, 64))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
x, y = torch.randn(512, 64), torch.randn(512, 64)
for _ in range(60):
    opt.zero_grad(); torch.nn.functional.mse_loss(model(x).softmax(-1) @ x.T @ x / 512, y).backward(); opt.step()
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV["avx2"]}


def test_env_vars_name_the_three_kernel_libraries():
    assert numerics.env_vars("avx2") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
    assert numerics.env_vars("compatible") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                               "MKL_CBWR": "COMPATIBLE"}
    assert numerics.env_vars("native") == {}
    with pytest.raises(ValueError, match="avx512"):
        numerics.env_vars("avx512")


def test_check_fails_loudly_in_a_process_started_without_the_pinning():
    code = "from bpo_ray import numerics\nnumerics.check('avx2', where='a worker')"
    done = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0
    assert "NumericsError" in done.stderr and "a worker" in done.stderr and "ATEN_CPU_CAPABILITY" in done.stderr


def test_compatible_profile_is_checked_like_avx2_and_runs_are_described_with_their_cpu():
    """``compatible`` pins MKL's COMPATIBLE branch (the one Intel documents for every maker's CPUs);
    a process pinned for avx2 does not pass its check, and the description names the CPU."""
    code = ("from bpo_ray import numerics\nnumerics.check('compatible', where='a worker')\n"
            "d = numerics.describe('compatible', 2)\nprint(d['capability'], d['env']['MKL_CBWR'], bool(d['cpu']))")
    ok = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), **numerics.env_vars("compatible")},
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.split()[-3:] == ["AVX2", "COMPATIBLE", "True"]
    wrong = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), **numerics.env_vars("avx2")},
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "MKL_CBWR" in wrong.stderr and "a worker" in wrong.stderr


def test_the_cli_pins_the_configs_kernels_before_the_stage_computes():
    probe = ("import os, sys\nfrom bpo_ray.cli import pin_numerics_early\npin_numerics_early(sys.argv[1:])\n"
             "import torch\nprint(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))")
    run = lambda *args: subprocess.run([sys.executable, "-c", probe, *args], env=_clean_env(), cwd=REPO,
                                       capture_output=True, text=True, timeout=120).stdout.split()
    assert run("--config", "tiny") == ["AVX2", "AVX2"]
    native = run("--config", "tiny", "--set", "numerics.cpu_isa=native")
    assert native[1] == "None"  # nothing pinned: whatever the CPU offers


def test_same_bits_pinned_at_start_pinned_by_the_cli_and_in_a_ray_worker(ray_cluster):
    """One small training run, three ways a stage process can come to its kernels."""
    at_start = python_last_line(TRAIN_SNIPPET, {**_clean_env(), **numerics.env_vars("avx2")})
    late = python_last_line("from bpo_ray.cli import pin_numerics_early\npin_numerics_early(['--config', 'tiny'])\n"
                            + TRAIN_SNIPPET, _clean_env())
    from bpo_ray.raycluster import worker_runtime_env

    @ray_cluster.remote(num_cpus=1)
    def in_worker(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip().splitlines()[-1]

    # the task's child inherits the worker's environment, which comes from the runtime env
    worker = ray_cluster.get(in_worker.options(runtime_env=worker_runtime_env(NumericsConfig(cpu_isa="avx2")))
                             .remote(TRAIN_SNIPPET))
    assert at_start.startswith("AVX2 ")
    assert at_start == late == worker


FIRST_CALL_SNIPPET = """
import torch
from bpo_ray import numerics
numerics.check("avx2", threads=2)
torch.manual_seed(0)
x = torch.rand(256, 64) * 1e-6
first, second = x.sqrt(), x.sqrt()
print(int((first != second).sum()))
"""


def test_check_resolves_mkl_vector_math_before_threads_race_to_it():
    """A fresh process's first MKL VML call (here ``sqrt``), run on 2 intra-op threads at once, can
    give one thread's chunk another kernel (pytorch/pytorch #188792). After ``numerics.check`` the
    first call equals the second in every process. Without the warm-up in ``check``, 3 of 12
    processes run one after another differed (1484 of 16384 values, all in the second thread's
    half); processes run side by side rarely show it, so these run one at a time."""
    env = {**_clean_env(), **numerics.env_vars("avx2")}
    differing = [python_last_line(FIRST_CALL_SNIPPET, env) for _ in range(12)]
    assert differing == ["0"] * 12


def test_worker_env_carries_storage_settings_and_the_pinning_but_no_secret(monkeypatch):
    from bpo_ray.raycluster import worker_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-forward")
    env = worker_env(NumericsConfig(cpu_isa="avx2"))
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "ATEN_CPU_CAPABILITY" not in worker_env(NumericsConfig(cpu_isa="native"))


def test_describe_names_the_kernel_libraries_a_run_computed_with():
    """The manifest names torch and the MKL and oneDNN builds inside it: MKL 2024.2 has the
    first-call race above, so the version is part of what a reader needs to compare runs."""
    import re

    import torch

    libraries = numerics.describe("native", 1)["libraries"]
    assert libraries["torch"] == torch.__version__
    if torch.backends.mkl.is_available():
        assert re.match(r"20\d\d\.\d", libraries["mkl"]), libraries
    if torch.backends.mkldnn.is_available():
        assert re.fullmatch(r"\d+(\.\d+)+", libraries["onednn"]), libraries
