"""``bpo_ray.train.lean_imports``: pandas and triton kept out of a CPU training process.

Each case runs in a fresh process: whether a package is imported is a per-process fact, and this
test process has imported both long ago. The end-to-end checks (a whole local run without them,
the same bits as a run with them) are in ``test_train_local.py``.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import python_last_line

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _run(code: str) -> dict:
    return json.loads(python_last_line(code))


def test_pyarrow_works_without_importing_pandas_and_pandas_stays_importable(tmp_path):
    out = _run(f"""
import json, os, sys
from bpo_ray.train.lean_imports import keep_pandas_out
first = keep_pandas_out()
import pyarrow as pa, pyarrow.parquet as pq
table = pa.table({{"id": ["a", "b", "c"], "n": [1, 2, 3]}})
pq.write_table(table, os.path.join({str(tmp_path)!r}, "part-0.parquet"))
back = pq.read_table({str(tmp_path)!r}).take([2, 0])  # a directory: pyarrow.dataset; take: pa.array
rows, arrow_only = back.to_pylist(), "pandas" in sys.modules
frame = back.to_pandas()  # an explicit conversion imports pandas, and works
print(json.dumps({{"first": first, "rows": rows, "arrow_only": arrow_only, "frame": frame["id"].tolist(),
                  "after": "pandas" in sys.modules}}))
""")
    assert out == {"first": True, "rows": [{"id": "c", "n": 3}, {"id": "a", "n": 1}], "arrow_only": False,
                   "frame": ["c", "a"], "after": True}


def test_without_the_first_look_pyarrow_imports_pandas(tmp_path):
    """The control: the same Arrow calls in a process that did not keep pandas out import it."""
    out = _run(f"""
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
pq.write_table(pa.table({{"id": ["a"]}}), os.path.join({str(tmp_path)!r}, "part-0.parquet"))
pq.read_table({str(tmp_path)!r}).take([0])
print(json.dumps({{"pandas": "pandas" in sys.modules}}))
""")
    assert out == {"pandas": True}


def test_a_process_that_imported_pandas_is_left_as_it_is():
    out = _run("""
import json, sys
import pandas
from bpo_ray.train.lean_imports import keep_pandas_out
print(json.dumps({"kept_out": keep_pandas_out(), "finders": [type(f).__name__ for f in sys.meta_path]}))
""")
    assert out["kept_out"] is False and "_Refused" not in out["finders"]


def test_triton_is_absent_while_a_cpu_run_lasts_and_back_after():
    out = _run("""
import importlib.util, json, sys
from bpo_ray.train.lean_imports import lean_process
with lean_process(use_gpu=False):
    spec_inside = importlib.util.find_spec("triton")
    import torch._dynamo  # imports triton at import time where it is installed
    from deepspeed.ops.triton_ops import is_triton_available  # so does DeepSpeed
    try:
        import triton
        imported = True
    except ModuleNotFoundError:
        imported = False
    with lean_process(use_gpu=False):  # nested (the local launcher's loop): leaves the outer mark
        pass
    still_marked = "triton" in sys.modules and sys.modules["triton"] is None
print(json.dumps({"spec_inside": spec_inside is not None, "imported": imported, "deepspeed": is_triton_available(),
                  "still_marked": still_marked, "after": "triton" in sys.modules,
                  "spec_after": importlib.util.find_spec("triton") is not None, "pandas": "pandas" in sys.modules}))
""")
    assert out == {"spec_inside": False, "imported": False, "deepspeed": False, "still_marked": True, "after": False,
                   "spec_after": TRITON_INSTALLED, "pandas": False}


@pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed here")
def test_a_gpu_run_keeps_triton():
    out = _run("""
import importlib.util, json
from bpo_ray.train.lean_imports import lean_process
with lean_process(use_gpu=True):
    print(json.dumps({"spec": importlib.util.find_spec("triton") is not None}))
""")
    assert out == {"spec": True}
