"""Portable CPU numerics: the same seed gives the same bits on every CPU of a machine kind.

PyTorch, oneDNN and MKL pick their kernels from the CPU's vector ISA at run time. Machines of
one kind differ (some AVX2 only, some AVX-512), the kernels round differently, and a long CPU
training run amplifies those last bits into a different model (measured: the default world's
base model had CHAIR_i 0.436 with AVX-512 kernels, 0.195 with AVX2 ones; docs/science.md).

``numerics.cpu_isa: avx2`` (the embedded default) makes every process of a stage use the AVX2
kernels, which every x86-64 machine of the kind has, through three environment variables:

* ``ATEN_CPU_CAPABILITY=avx2``: PyTorch's own kernels (read lazily, at the first dispatch);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's JIT kernels;
* ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility mode (BLAS/GEMM).

This holds within one CPU maker: MKL's ``AVX2`` branch exists on Intel CPUs only, and other
makers' CPUs run MKL's AUTO branch under the same setting (Intel's oneMKL developer guide,
"Getting Started with Conditional Numerical Reproducibility"). An Intel Xeon built another base
model than the AMD EPYC machines of the documented runs (docs/science.md, "Another CPU maker").
``numerics.cpu_isa: compatible`` sets ``MKL_CBWR=COMPATIBLE`` instead: the SSE2 branch that Intel
documents for every maker's CPUs, at about 2x the GEMM time. It is not yet checked on AMD.

``numerics.threads`` fixes the intra-op thread count where a stage runs one big process (the
world recipe): ATen and MKL split reductions by thread, so the count is part of the numerics too.
``native`` (GPU clusters) leaves everything as the CPU offers it.

Whatever the profile, :func:`check` first resolves MKL's vector-math (VML) dispatch in one thread
(:func:`resolve_vml_dispatch`): PyTorch routes float unary ops (``sqrt``, ``exp``, ``log``...) to
MKL VML, MKL picks each function's kernel lazily at its first call, and when that first call runs
on several intra-op threads at once one thread's chunk can get another kernel (pytorch/pytorch
#188792). Measured here: a fresh 2-thread process's first ``sqrt`` gave other bits in 3 of 12
runs (docs/science.md, "A first-call race in MKL's vector math").
"""

from __future__ import annotations

import os
import re
from typing import Optional

PORTABLE_ENV: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "compatible": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"},
    "native": {},
}
# The kernel set PyTorch reports under each pinned profile.
CAPABILITY = {"avx2": "avx2", "compatible": "avx2"}


class NumericsError(RuntimeError):
    """A process computes with other kernels than the config asks for."""


def env_vars(cpu_isa: str) -> dict[str, str]:
    """The environment that pins ``cpu_isa`` (empty for ``native``)."""
    try:
        return dict(PORTABLE_ENV[cpu_isa])
    except KeyError:
        raise ValueError(f"unknown numerics.cpu_isa {cpu_isa!r}; choose from {sorted(PORTABLE_ENV)}") from None


def pin(cpu_isa: str) -> dict[str, str]:
    """Set the pinning variables in this process's environment (children and a local Ray inherit
    them); returns them. Call before the first tensor operation."""
    wanted = env_vars(cpu_isa)
    os.environ.update(wanted)
    return wanted


def active_capability() -> str:
    """PyTorch's CPU kernel set in this process, e.g. ``AVX2`` or ``AVX512``."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def check(cpu_isa: str, threads: Optional[int] = None, where: str = "this process") -> None:
    """Fail loudly where ``cpu_isa`` is pinned but this process runs other kernels (e.g. a Ray
    worker started without the stage's runtime env); set ``threads`` when given."""
    import torch

    wanted = env_vars(cpu_isa)
    if wanted:
        missing = {k: v for k, v in wanted.items() if os.environ.get(k) != v}
        capability = active_capability()
        if missing or capability.lower() != CAPABILITY[cpu_isa]:
            raise NumericsError(
                f"{where} runs {capability} kernels, but numerics.cpu_isa={cpu_isa} asks for portable "
                f"{CAPABILITY[cpu_isa].upper()} numerics; its environment lacks {missing}. Start it with those variables "
                "(bpo-ray's stages pass them to every Ray worker), or set numerics.cpu_isa=native")
    resolve_vml_dispatch()
    if threads:
        set_threads(int(threads))


# The unary ops ATen hands to MKL VML for float and double when built with MKL (the
# IMPLEMENT_VML_MKL list of aten/src/ATen/cpu/vml.h); the others run ATen's own vector code.
VML_OPS = ("abs", "acos", "asin", "atan", "cos", "erf", "erfc", "exp", "expm1", "log", "log10", "log1p",
           "log2", "sin", "sqrt", "tan", "tanh", "trunc")
_vml_resolved = False


def resolve_vml_dispatch() -> None:
    """Call every VML-routed unary op once on a one-element tensor (float and double), in this
    thread, so that MKL resolves each function's kernel before intra-op threads can race to it
    (pytorch/pytorch #188792: one thread's chunk of a process's first concurrent call can run
    another kernel, so the same seed gives other bits in some runs). Idempotent, under 1 ms;
    it pages in MKL's vector-math code, 6-9 MB of RSS, most of which a run using them pays anyway."""
    global _vml_resolved
    if _vml_resolved:
        return
    import torch

    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_OPS:
            getattr(torch, name)(x)
    _vml_resolved = True


def set_threads(threads: int) -> None:
    """``torch.set_num_threads``, checked: the thread count is part of the numerics (ATen and MKL
    split reductions by thread). vLLM's in-process CPU engine replaces ``torch.set_num_threads``
    with a no-op for the rest of the process (its thread binding), which would leave the process on
    another count, so other bits, silently: torch's own builtin is used then. Going to more than
    one thread resolves MKL's vector-math dispatch first (:func:`resolve_vml_dispatch`)."""
    import torch

    if threads > 1:
        resolve_vml_dispatch()
    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads:
        torch._C.set_num_threads(threads)
    if torch.get_num_threads() != threads:
        raise NumericsError(f"cannot set torch's intra-op threads to {threads} in this process "
                            f"(it runs {torch.get_num_threads()}); run the stage in a process of its own")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def kernel_libraries() -> dict[str, str]:
    """torch's version and the MKL and oneDNN builds inside it (``torch.__config__.show()``), which
    the package versions of ``schemas.library_versions`` do not show: MKL 2024.2 has the VML
    first-call race that :func:`resolve_vml_dispatch` works around, later ones do not."""
    import torch

    found = {"torch": torch.__version__}
    for line in torch.__config__.show().splitlines():
        line = line.strip().lstrip("- ")
        if "Math Kernel Library Version" in line:
            found["mkl"] = line.split("Version", 1)[1].split(" for ")[0].strip()
        elif "MKL-DNN" in line or "oneDNN" in line:
            version = re.search(r"\bv(\d+(?:\.\d+)+)", line)
            found["onednn"] = version.group(1) if version else line
    return found


def describe(cpu_isa: str, threads: Optional[int]) -> dict[str, object]:
    """What a manifest records about the numerics of a run: the profile, the kernels PyTorch runs,
    the pinning variables, the CPU (MKL's ``MKL_CBWR=AVX2`` branch exists on Intel CPUs only;
    elsewhere MKL runs its AUTO branch, so the CPU's maker is part of the numerics) and the kernel
    libraries' versions."""
    return {"cpu_isa": cpu_isa, "threads": threads, "capability": active_capability(),
            "env": {k: os.environ.get(k) for k in PORTABLE_ENV["avx2"]}, "cpu": cpu_model(),
            "libraries": kernel_libraries()}
