"""``train.launcher: local`` and ``reference.launcher: local``: the training function and the
reference scorer in the calling process, without Ray.

- Both launchers train the same bits (one worker, the same config), and score the same reference
  log-probs.
- A local run keeps its checkpoints itself (the newest ``checkpoints_to_keep``, locally and on a
  loopback S3 server).
- A local run whose process dies resumes when the command runs again, to the same adapter.
- A local run imports nothing of Ray, nor pandas and triton (``lean_imports``), and keeping
  those two out changes no bit.
- Bad set-ups are refused before any work: several workers, a torchrun world, unpinned kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Optional

import pyarrow.parquet as pq
import pytest
import torch

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.schemas import read_manifest
from bpo_ray.train.checkpoint import CHECKPOINTS_DIR, TrainState, latest_complete_checkpoint, persist_checkpoint
from bpo_ray.train.local_launch import LauncherError, check_single_process
from bpo_ray.train.loop import FAIL_AT_STEP_ENV
from bpo_ray.train.plots import read_metrics
from train_pairs import build_pairs_rows, records_by_attempt, write_pairs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(tiny_models, *extra: str) -> list[str]:
    # 32 pairs, batch 4, one worker: 6 steps; a checkpoint every 2 steps
    return [f"models.mllm={tiny_models['mllm']}", "train.per_device_batch_size=4", "train.num_workers=1",
            "train.epochs=0.75", "train.lr=5e-3", "train.warmup_ratio=0", "train.checkpoint_every=2",
            "train.max_length=256", "train.checkpoints_to_keep=2", *extra]


def _tensors(adapter_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ fast: set-up checks
def test_local_launcher_needs_one_worker():
    with pytest.raises(ValueError, match="launcher 'local' runs one worker, in this process, so num_workers must be 1, not 2"):
        load_config("tiny", ["train.launcher=local", "train.num_workers=2"])
    assert load_config("tiny", ["train.launcher=local", "train.num_workers=1"]).train.launcher == "local"


def test_a_torchrun_world_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LauncherError, match="WORLD_SIZE=2.*use train.launcher=ray_train"):
        check_single_process()


def _in_a_fresh_process(code: str) -> None:
    """Run ``code`` (asserts inside) in a new interpreter: the kind of process the local launcher is
    for. The pytest process is not one: its in-process vLLM tests leave a torch.distributed group
    and a disabled ``torch.set_num_threads`` behind."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_local_worker_sets_up_one_process_group_and_restores_everything():
    _in_a_fresh_process("""
        import os, pytest, torch
        from bpo_ray.train.local_launch import LauncherError, local_worker
        threads = torch.get_num_threads()
        assert threads != 1 or os.cpu_count() == 1
        with local_worker({"TOKENIZERS_PARALLELISM": "false", "BPO_RAY_TEST_VAR": "1"}, threads=1) as env:
            assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"
            # a value the user exported wins over the workers' default
            assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["BPO_RAY_TEST_VAR"] == "1"
            assert "TOKENIZERS_PARALLELISM" not in env
            assert torch.get_num_threads() == 1
            assert torch.distributed.get_world_size() == 1 and torch.distributed.get_backend() == "gloo"
            t = torch.tensor([2.0])
            torch.distributed.all_reduce(t)  # what the loop's collectives do
            assert t.item() == 2.0
            with pytest.raises(LauncherError, match="already has a torch.distributed process group"):
                with local_worker():
                    pass
        assert not torch.distributed.is_initialized()
        assert "MASTER_PORT" not in os.environ and "BPO_RAY_TEST_VAR" not in os.environ
        assert torch.get_num_threads() == threads
    """)


def test_threads_are_set_where_vllm_disabled_torch_set_num_threads():
    """vLLM's in-process CPU engine replaces ``torch.set_num_threads`` with a no-op for the rest of
    the process (``vllm/v1/worker/cpu_worker.py``); a local run there still gets its one thread,
    so the bits a Ray Train worker gets."""
    _in_a_fresh_process("""
        import torch
        from bpo_ray.train.local_launch import local_worker
        torch.set_num_threads = lambda n: None  # what vLLM's CPU worker installs
        threads = torch.get_num_threads()
        want = 1 if threads != 1 else 2
        with local_worker(threads=want):
            assert torch.get_num_threads() == want
        assert torch.get_num_threads() == threads
    """)


def _fake_checkpoint(root, step: int, world: int = 1) -> str:
    """A checkpoint directory as the loop writes one (tiny stand-in files)."""
    d = root / f"ckpt-{step}"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (d / "deepspeed" / "state").mkdir(parents=True)
    for rank in range(world):
        (d / "deepspeed" / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"moments")
    (d / "state.json").write_text(TrainState(step=step, world_size=world).to_json())
    return str(d)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_persisted_checkpoints_keep_the_newest_complete_ones(where, tmp_path, request):
    out = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_server')['root']}/persist"
    # a crashed run's leftover without state.json, which must not survive pruning
    storage.write_bytes(storage.join(out, CHECKPOINTS_DIR, "checkpoint_step-00000001", "adapter", "x"), b"partial")
    for step in (2, 4, 6):
        uri = persist_checkpoint(_fake_checkpoint(tmp_path, step), out, step, rank=0, keep=2)
        assert uri.endswith(f"checkpoint_step-{step:08d}")
    names = sorted({f.split(f"{CHECKPOINTS_DIR}/", 1)[1].split("/")[0]
                    for f in storage.list_files(storage.join(out, CHECKPOINTS_DIR))})
    assert names == ["checkpoint_step-00000004", "checkpoint_step-00000006"]
    assert latest_complete_checkpoint(out)[0] == 6


# ------------------------------------------------------------------------------ slow: real runs
@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("local_pairs")
    return write_pairs(build_pairs_rows(str(root / "world"), n_scenes=40, limit=32), str(root / "generated"))


def _cli(stage: str, pairs: str, out: str, overrides: list[str], env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python -m bpo_ray <stage>``, as a user runs it."""
    cmd = [sys.executable, "-m", "bpo_ray", stage, "--pairs", pairs, "--out", out]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def launcher_runs(ray_cluster, tiny_models, pairs, tmp_path_factory) -> dict:
    """The same 6-step run with each launcher: Ray Train on the session's cluster, and the local
    launcher through the CLI in a process of its own."""
    from bpo_ray.train.trainer import run_training

    outs = {"ray_train": str(tmp_path_factory.mktemp("launcher_ray_train")),
            "local": str(tmp_path_factory.mktemp("launcher_local"))}
    outs["ray_train_result"] = run_training(load_config("tiny", _overrides(tiny_models, "train.launcher=ray_train")),
                                            pairs, outs["ray_train"])
    outs["local_proc"] = _cli("train", pairs, outs["local"], _overrides(tiny_models, "train.launcher=local"))
    assert outs["local_proc"].returncode == 0, outs["local_proc"].stderr[-3000:]
    return outs


@pytest.mark.slow
def test_both_launchers_train_the_same_bits(launcher_runs):
    ray_train, local = launcher_runs["ray_train"], launcher_runs["local"]
    assert launcher_runs["ray_train_result"].steps == 6 and "bpo-ray train: 6 steps" in launcher_runs["local_proc"].stdout
    assert _same_bits(_tensors(os.path.join(ray_train, "adapter")), _tensors(os.path.join(local, "adapter")))
    ours, theirs = read_metrics(os.path.join(local, "metrics.jsonl")), read_metrics(os.path.join(ray_train, "metrics.jsonl"))
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05  # it learned
    # the local run kept its own checkpoints: the newest two of steps 2, 4, 6
    names = sorted(os.listdir(os.path.join(local, CHECKPOINTS_DIR)))
    assert names == ["checkpoint_step-00000004", "checkpoint_step-00000006"]
    timings = json.loads(open(os.path.join(local, "manifest.json")).read())["timings"]
    assert "driver.ray_init_s" not in timings and "ray_init_s" not in timings


def _local_run_in_a_fresh_process(tiny_models, pairs, out, preimport: str = "") -> dict:
    """The reference pass and 2 training steps with the local launchers, in a fresh process (after
    ``preimport``, Python run first); the process's imports when they are done."""
    code = (f"{preimport}\nimport json, sys; from bpo_ray.config import load_config; "
            "from bpo_ray.train.trainer import run_training; from bpo_ray.train.reference import run_reference; "
            f"cfg = load_config('tiny', {_overrides(tiny_models, 'train.launcher=local', 'reference.launcher=local', 'train.max_steps=2')!r}); "
            f"run_reference(cfg, {pairs!r}, {str(out / 'ref')!r}); "
            f"r = run_training(cfg, {str(out / 'ref')!r}, {str(out / 'out')!r}); "
            "print('RESULT', json.dumps({'steps': r.steps, 'reference': r.reference, "
            "'ray': sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')), "
            "'pandas': 'pandas' in sys.modules, 'triton': sys.modules.get('triton') is not None}))")
    from bpo_ray import numerics

    env = {**os.environ, **numerics.env_vars("avx2")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])


@pytest.fixture(scope="module")
def lean_and_full_runs(tiny_models, pairs, tmp_path_factory) -> dict:
    """The same local run twice: as it runs (lean: pandas and triton kept out), and in a process
    that imported pandas and triton before (so nothing is kept out)."""
    out = {"lean": tmp_path_factory.mktemp("lean_run"), "full": tmp_path_factory.mktemp("full_run")}
    out["lean_result"] = _local_run_in_a_fresh_process(tiny_models, pairs, out["lean"])
    out["full_result"] = _local_run_in_a_fresh_process(
        tiny_models, pairs, out["full"], "import importlib.util, pandas\n"
        "if importlib.util.find_spec('triton'): import triton")
    return out


@pytest.mark.slow
def test_a_local_run_imports_nothing_of_ray_nor_pandas_nor_triton(lean_and_full_runs):
    """No Ray module is ever imported (Ray Train's imports, Ray Data and pandas among them, are
    ~100 MB per process); nor pandas and triton, which the run never uses (``lean_imports``)."""
    assert lean_and_full_runs["lean_result"] == {"steps": 2, "reference": "precomputed", "ray": [], "pandas": False,
                                                 "triton": False}


@pytest.mark.slow
def test_keeping_pandas_and_triton_out_changes_no_bit(lean_and_full_runs):
    import importlib.util

    lean, full = lean_and_full_runs["lean"], lean_and_full_runs["full"]
    assert lean_and_full_runs["full_result"] == {"steps": 2, "reference": "precomputed", "ray": [], "pandas": True,
                                                 "triton": importlib.util.find_spec("triton") is not None}
    assert _same_bits(_tensors(str(lean / "out" / "adapter")), _tensors(str(full / "out" / "adapter")))
    assert read_metrics(str(lean / "out" / "metrics.jsonl"))[-1]["loss"] == \
        read_metrics(str(full / "out" / "metrics.jsonl"))[-1]["loss"]
    scored = [pq.read_table(str(run / "ref" / "pairs")).sort_by("id").select(["ref_chosen_logp", "ref_rejected_logp"])
              for run in (lean, full)]
    assert scored[0].equals(scored[1])


@pytest.mark.slow
def test_local_reference_pass_scores_the_same_log_probs(ray_cluster, tiny_models, pairs, tmp_path):
    from bpo_ray.train.reference import run_reference

    overrides = _overrides(tiny_models, "reference.batch_size=8")
    run_reference(load_config("tiny", [*overrides, "reference.launcher=ray_data"]), pairs, str(tmp_path / "ray_data"))
    proc = _cli("reference", pairs, str(tmp_path / "local"), [*overrides, "reference.launcher=local"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = {}
    for launcher in ("ray_data", "local"):
        manifest = read_manifest(str(tmp_path / launcher / "manifest.json"))
        assert manifest.counts.items_in == manifest.counts.paired == 32
        table = pq.read_table(str(tmp_path / launcher / "pairs")).sort_by("id")
        scored[launcher] = table.select(["id", "ref_chosen_logp", "ref_rejected_logp"]).to_pylist()
    assert scored["local"] == scored["ray_data"]
    assert all(r["ref_chosen_logp"] < 0 for r in scored["local"])


@pytest.mark.slow
def test_a_killed_local_run_resumes_when_run_again(launcher_runs, tiny_models, pairs, tmp_path):
    """The CLI, as a user runs it: the process dies at the start of step 5 (its checkpoint at step
    4 is in storage); the same command again resumes there and ends with the uninterrupted run's
    adapter, bit for bit."""
    out = str(tmp_path / "out")
    overrides = _overrides(tiny_models, "train.launcher=local")
    env = {**os.environ, FAIL_AT_STEP_ENV: "5"}
    first = _cli("train", pairs, out, overrides, env)
    assert first.returncode != 0, first.stdout[-2000:]
    assert "injected failure" in first.stderr
    assert latest_complete_checkpoint(out)[0] == 4
    second = _cli("train", pairs, out, overrides, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "6 steps" in second.stdout
    attempts = records_by_attempt(out)
    assert [r["step"] for r in attempts[0][1:]] == [1, 2, 3, 4]
    assert attempts[1][0]["resumed_from_step"] == 4
    assert [r["step"] for r in attempts[1][1:]] == [5, 6]
    assert _same_bits(_tensors(os.path.join(out, "adapter")), _tensors(os.path.join(launcher_runs["local"], "adapter")))


@pytest.mark.slow
def test_unpinned_kernels_are_refused_before_training(tiny_models, pairs, tmp_path):
    """numerics.cpu_isa=avx2 asks for AVX2 kernels; a process started without the pinning variables
    (here: the CLI with them removed and the pinning asked of a config it cannot see) is refused
    with the reason, not trained with other bits."""
    from bpo_ray import numerics

    env = {k: v for k, v in os.environ.items() if k not in numerics.env_vars("avx2")}
    code = ("import sys; from bpo_ray.config import load_config; from bpo_ray.train.trainer import run_training; "
            f"run_training(load_config('tiny', {_overrides(tiny_models, 'train.launcher=local')!r}), {pairs!r}, "
            f"{str(tmp_path / 'out')!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "numerics.cpu_isa=avx2" in proc.stderr and "train.launcher=local" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
