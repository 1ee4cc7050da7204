"""Two packages a CPU training process imports without using them, kept out of it (issue #20
item 7; docs/train.md, "Memory").

- **triton**, about 65 MB of RSS. torch imports it whenever the package is installed:
  ``torch._dynamo``, which transformers imports, checks for it at import, and
  ``deepspeed.initialize`` imports DeepSpeed's Triton ops. It is installed here because vLLM
  depends on it, but a process that computes on the CPU has nothing for it to compile for.
  ``lean_process`` marks it absent while a CPU run lasts, the way Python marks a module that
  must not be imported: ``sys.modules["triton"] = None``. ``import triton`` then raises
  ``ModuleNotFoundError`` and ``importlib.util.find_spec("triton")`` returns None. torch and
  DeepSpeed take that as "not installed", as on torch's CPU-only build, and keep that answer.
  The mark is removed when the run ends. A GPU run keeps triton.
- **pandas**, 35-50 MB. pyarrow imports it the first time it turns a Python object into Arrow
  (``pa.array``, ``pa.table``, ``Table.take``, reading a Parquet directory), to check whether the
  object is a pandas one. pyarrow keeps the outcome of that first try (``_PandasAPIShim`` in
  ``pandas-shim.pxi``). So ``keep_pandas_out`` makes that first try while an import finder
  refuses pandas (pyarrow imports it from compiled code, which takes the ``None`` mark for the
  module itself instead of failing). pyarrow then treats every input as a non-pandas one for
  the rest of the process. An explicit conversion (``Table.to_pandas``) still imports pandas
  and works.

Nothing is patched: both libraries take the path they take where the package is not installed.
No number changes, since only "is this installed" answers change. The adapters, losses and
reference log-probs are the same bits with and without (``tests/test_train_local.py``,
``bench/train.py``). Where a package is already imported (a Ray worker imports pandas with Ray
Data), nothing is kept out and nothing changes.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from typing import Iterator


@contextlib.contextmanager
def absent(name: str) -> Iterator[None]:
    """Within this context ``import <name>`` fails as if the package were not installed, unless it
    is imported already (or marked by an enclosing context). The mark is removed afterwards."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]  (Python's "import halted" mark)
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


class _Refused(importlib.abc.MetaPathFinder):
    """An import finder under which ``import <name>`` (and its submodules) fails as if the package
    were not installed."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (kept out: bpo_ray.train.lean_imports)",
                                      name=fullname)
        return None


def keep_pandas_out() -> bool:
    """pyarrow's one look for pandas, made now with pandas refused (see the module's docstring).
    Returns whether pandas is out of this process. A no-op if pandas is imported already."""
    if "pandas" in sys.modules:
        return False
    refused = _Refused("pandas")
    sys.meta_path.insert(0, refused)
    try:
        import pyarrow as pa

        pa.array([0])  # a Python list: pyarrow asks whether it is a pandas object, once
    finally:
        sys.meta_path.remove(refused)
    return "pandas" not in sys.modules


@contextlib.contextmanager
def lean_process(use_gpu: bool) -> Iterator[None]:
    """A training or scoring process's set-up: pandas kept out for good, and triton kept out
    while the context lasts, unless the process computes on a GPU (``use_gpu``)."""
    keep_pandas_out()
    if use_gpu:
        yield
        return
    with absent("triton"):
        yield
