"""bench/train.py: this trainer against TRL's DPOTrainer, in one run, on the same tiny LLaVA, the
same bias-world pairs, batch size, LoRA config, learning rate and number of steps, each with the
reference computed online (adapter disabled) and precomputed.

    .venv/bin/python bench/train.py [--pairs 64] [--steps 16] [--batch 4] [--repeats 2] [--phases]
                                    [--out runs/bench/train]

Every run is its own subprocess (peak RSS = that process's ``ru_maxrss``; for bpo-ray the Ray
Train worker's, which is where the model lives), single-threaded torch on both sides so neither
gets more cores. bpo-ray runs one Ray Train worker under DeepSpeed ZeRO-2; TRL runs its own loop
(Trainer/accelerate, no DeepSpeed). samples/s is the median over steps after the first two.
Stock TRL refuses precomputed reference log-probs for vision datasets; the "trl precomputed" row
patches that in (a collator that passes the columns through) to show what it would give.

It prints, from one invocation: samples/s, peak RSS and walls of each run, the bpo-ray / TRL
ratios (train wall, process wall, samples/s, peak RSS, reference pass), the sha256 of the trained
adapter's tensors (and of the reference log-probs) over the repeats, and where the wall goes:
phase tables from the timelines the runs record (driver and Ray Train worker phases with their
CPU seconds, ``bpo_ray.train.timeline``) and Ray's task trace (``ray.timeline()``), see
``bench/train_phases.py``; ``--phases`` adds every phase and Ray span of the fastest runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # train_pairs: bias-world pairs with corrupted answers

LORA = {"rank": 16, "alpha": 32, "dropout": 0.0}
LAUNCHERS = {"bpo-ray": "ray_train", "bpo-ray-local": "local"}  # bench run -> train.launcher
OURS = tuple(LAUNCHERS)
LR, BETA, MAX_LENGTH = 5e-3, 0.1, 256


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _steady(step_times: list[float], batch: int) -> float:
    tail = step_times[2:] if len(step_times) > 3 else step_times
    return batch / statistics.median(tail)


def _late(losses: list[float]) -> float:
    """Mean loss over the last quarter of the steps (one batch's loss is too noisy to compare)."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------------------- setup
def setup(work: Path, n_pairs: int) -> dict:
    from bpo_ray.models.tiny import build_tiny_models
    from train_pairs import build_pairs_rows, write_pairs

    models = build_tiny_models(work / "models", seed=0)
    rows = build_pairs_rows(str(work / "world"), n_scenes=max(40, n_pairs), limit=n_pairs)
    write_pairs(rows, str(work / "pairs"))
    return {"mllm": models["mllm"], "pairs": str(work / "pairs"), "n_pairs": len(rows)}


def adapter_digest(adapter_dir: str) -> str:
    """sha256 over the adapter's tensors (names, dtypes, shapes, bytes): the same digest means the
    same trained bits."""
    import hashlib

    from safetensors.torch import load_file

    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- bpo-ray runs
def run_bpo(setup_info: dict, work: Path, reference: str, steps: int, batch: int, launcher: str) -> dict:
    """One bpo-ray run: ``launcher`` ray_train (Ray Train's controller and worker process; the
    reference pass a Ray Data job) or local (both in this process; Ray is not imported)."""
    from bpo_ray.train.timeline import Timeline, process_start_time

    created = process_start_time() or time.time()
    bench = Timeline()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    local = launcher == "local"
    if not local:  # the local launcher runs without Ray
        import ray
    from bpo_ray.config import load_config
    from bpo_ray.train.plots import read_metrics
    from bpo_ray.train.reference import run_reference
    from bpo_ray.train.trainer import run_training
    from train_phases import ray_spans

    bench.add("bench.imports", created)  # the interpreter's start and this process's imports
    if not local:
        with bench.phase("bench.ray_init"):
            ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    overrides = [f"models.mllm={setup_info['mllm']}", "train.num_workers=1", "train.zero_stage=2",
                 f"train.launcher={launcher}", f"reference.launcher={'local' if local else 'ray_data'}",
                 f"train.per_device_batch_size={batch}", f"train.max_steps={steps}",
                 # the same cosine schedule as TRL's: it ends after exactly `steps` steps
                 f"train.epochs={steps * batch / setup_info['n_pairs']}",
                 f"train.lr={LR}", f"train.beta={BETA}", f"train.max_length={MAX_LENGTH}", "train.warmup_ratio=0",
                 f"train.lora.rank={LORA['rank']}", f"train.lora.alpha={LORA['alpha']}", "train.lora.dropout=0.0",
                 f"train.checkpoint_every={steps}", "reference.batch_size=8"]
    cfg = load_config("tiny", overrides)
    pairs, extra = setup_info["pairs"], {}
    reference_timeline = Timeline()
    if reference == "precomputed":
        with bench.phase("bench.reference_pass"):
            run_reference(cfg, pairs, str(work / "ref"), timeline=reference_timeline)
        extra["reference_pass_s"] = bench.phases[-1].end - bench.phases[-1].start
        extra["reference_sha256"] = reference_digest(str(work / "ref" / "pairs"))
        pairs = str(work / "ref")
    with bench.phase("bench.run_training"):
        result = run_training(cfg, pairs, str(work / "out"))
    run_training_s = bench.phases[-1].end - bench.phases[-1].start
    end = time.time()  # the run's result is in hand here; what follows is bookkeeping
    spans = [] if local else ray_spans(created)
    if not local:
        with bench.phase("bench.ray_shutdown"):
            ray.shutdown()
    records = read_metrics(str(work / "out" / "metrics.jsonl"))
    assert result.reference == ("precomputed" if reference == "precomputed" else "adapter_disabled")
    phases = bench.phases + reference_timeline.prefixed("reference.").phases + result.timeline.phases
    return {"samples_per_s": _steady([r["step_time_s"] for r in records], batch),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in records), "wall_s": result.wall_s,
            "run_training_s": run_training_s,
            "process_wall_s": end - created + (0 if local else bench.phases[-1].end - bench.phases[-1].start),
            "first_loss": records[0]["loss"], "late_loss": _late([r["loss"] for r in records]), "steps": len(records),
            "adapter_sha256": adapter_digest(str(work / "out" / "adapter")),
            "phases": [list(p) for p in phases], "spans": spans, **extra}


def reference_digest(pairs_dir: str) -> str:
    """sha256 over every pair's id and reference log-probs (sorted by id): the same digest means
    the same reference log-prob bits, whatever the row order or file split."""
    import hashlib

    from bpo_ray.schemas import PAIR_SCHEMA, read_parquet

    table = read_parquet(pairs_dir, PAIR_SCHEMA)
    rows = sorted(zip(table.column("id").to_pylist(), table.column("ref_chosen_logp").to_pylist(),
                      table.column("ref_rejected_logp").to_pylist()))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# -------------------------------------------------------------------------------------- TRL runs
def run_trl(setup_info: dict, work: Path, reference: str, steps: int, batch: int) -> dict:
    from bpo_ray.train.timeline import Timeline, process_start_time

    created = process_start_time() or time.time()
    bench = Timeline()
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from bpo_ray.config.train import LoraConfig as BpoLora
    from bpo_ray.images import load_image
    from bpo_ray.models.prompts import build_prompt
    from bpo_ray.schemas import PAIR_SCHEMA, read_parquet
    from bpo_ray.train.lora import resolve_targets

    bench.add("bench.imports", created)
    t_start = time.perf_counter()
    with bench.phase("trl.data"):
        table = read_parquet(os.path.join(setup_info["pairs"], "pairs"), PAIR_SCHEMA)
        rows = table.to_pylist()
        data = Dataset.from_list([{"image": load_image(r["image"])[0], "prompt": build_prompt(r["prompt"]),
                                   "chosen": " " + r["chosen"] + "</s>", "rejected": " " + r["rejected"] + "</s>"}
                                  for r in rows])
    with bench.phase("trl.load_model"):
        model = LlavaForConditionalGeneration.from_pretrained(setup_info["mllm"], dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(setup_info["mllm"])
    targets = resolve_targets(model, BpoLora(**LORA))  # the very same layers bpo-ray adapts
    peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=targets)
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, max_steps=steps, beta=BETA,
                     loss_type=["sigmoid"], max_length=MAX_LENGTH, gradient_checkpointing=False, use_cpu=True,
                     report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0,
                     remove_unused_columns=False)
    extra = {}
    collator = None
    if reference == "precomputed":
        with bench.phase("trl.stock_refusal"):  # not counted in TRL's wall: only shows the refusal
            try:  # stock TRL: refused for vision datasets
                refused = copy.deepcopy(args)
                refused.precompute_ref_log_probs = True
                DPOTrainer(model=model, args=refused, train_dataset=data, processing_class=processor,
                           peft_config=peft_config)
            except ValueError as exc:
                extra["stock_trl_error"] = str(exc).split(".")[0]
            model = LlavaForConditionalGeneration.from_pretrained(setup_info["mllm"], dtype=torch.float32)

        class WithReference(DataCollatorForVisionPreference):
            def torch_call(self, examples):
                refs = [(e.pop("ref_chosen_logps"), e.pop("ref_rejected_logps")) for e in examples]
                out = super().torch_call(examples)
                out["ref_chosen_logps"] = torch.tensor([c for c, _ in refs])
                out["ref_rejected_logps"] = torch.tensor([r for _, r in refs])
                return out

        collator = WithReference(processor=processor, max_length=MAX_LENGTH)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    with bench.phase("trl.trainer_init"):
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=processor,
                             peft_config=peft_config, data_collator=collator, callbacks=[StepTimer()])
    if reference == "precomputed":
        # What TRL's _precompute_ref_logps does for text data, run with TRL's own reference forward.
        with bench.phase("trl.reference_pass"):
            loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=DataCollatorForVisionPreference(
                processor=processor, max_length=MAX_LENGTH), shuffle=False)
            chosen, rejected = [], []
            for inputs in loader:
                c, r = trainer.compute_ref_log_probs(trainer.model, inputs)
                chosen += c.tolist()
                rejected += r.tolist()
            trainer.train_dataset = data.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps",
                                                                                         rejected)
            trainer.precompute_ref_logps = True
        extra["reference_pass_s"] = bench.phases[-1].end - bench.phases[-1].start
    with bench.phase("trl.train"):
        trainer.train()
    end = time.time()
    refusal = sum(p.end - p.start for p in bench.phases if p.name == "trl.stock_refusal")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"samples_per_s": _steady(times, batch), "peak_rss_mb": _peak_rss_mb(),
            "wall_s": time.perf_counter() - t_start - refusal, "process_wall_s": end - created - refusal,
            "train_s": bench.phases[-1].end - bench.phases[-1].start, "first_loss": losses[0],
            "late_loss": _late(losses), "steps": len(times), "phases": [list(p) for p in bench.phases], **extra}


# ------------------------------------------------------------------------------------------ main
def _child(args) -> None:
    info = json.loads(args.setup)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.run}-{args.reference}-", dir=args.work))
    if args.run == "trl":
        result = run_trl(info, work, args.reference, args.steps, args.batch)
    else:
        result = run_bpo(info, work, args.reference, args.steps, args.batch, LAUNCHERS[args.run])
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps (steps x batch <= pairs: one epoch at most)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is reported")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "train"))
    parser.add_argument("--phases", action="store_true", help="also list every phase and Ray span of the fastest runs")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return _child(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    info = setup(out, args.pairs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    runs: dict[tuple[str, str], list[dict]] = {}
    order = [(run, ref) for run in (*OURS, "trl") for ref in ("adapter_disabled", "precomputed")]
    from bpo_ray import numerics
    from bpo_ray.config import load_config

    # a local run computes in its own process: pin its kernels as the stages pin their Ray workers'
    pinned = {**env, **numerics.env_vars(load_config("tiny").numerics.cpu_isa)}
    for repeat in range(args.repeats):
        for run, reference in (order if repeat % 2 == 0 else order[::-1]):  # alternate against drift in load
            print(f"== {run}, reference {reference} (repeat {repeat + 1}/{args.repeats}) ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--run", run, "--reference", reference,
                                   "--setup", json.dumps(info), "--work", str(out), "--steps", str(args.steps),
                                   "--batch", str(args.batch)], env=pinned if run == "bpo-ray-local" else env,
                                  capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
                raise SystemExit(f"{run}/{reference} failed (exit {proc.returncode})")
            runs.setdefault((run, reference), []).append(json.loads(line[len("BENCH_RESULT "):]))
            print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in runs[(run, reference)][-1].items()
                          if k not in ("phases", "spans")}, flush=True)
    report(results_of(runs), info, args, load_before, os.getloadavg(), out)


def results_of(runs: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], dict]:
    """Best of the repeats (on a shared machine the fastest run is the least disturbed one): the
    highest samples/s and, separately, the lowest walls (with that run's phases); the highest RSS."""
    out = {}
    for key, rs in runs.items():
        fastest = min(rs, key=lambda r: r["wall_s"])
        out[key] = {**max(rs, key=lambda r: r["samples_per_s"]), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "wall_s": fastest["wall_s"], "process_wall_s": min(r["process_wall_s"] for r in rs),
                    "run_training_s": min((r["run_training_s"] for r in rs if "run_training_s" in r), default=None),
                    "phases": fastest["phases"], "spans": fastest.get("spans", []),
                    "all_samples_per_s": [round(r["samples_per_s"], 2) for r in rs],
                    "all_wall_s": [round(r["wall_s"], 2) for r in rs],
                    "adapter_sha256": sorted({r.get("adapter_sha256") for r in rs} - {None}),
                    "reference_sha256": sorted({r.get("reference_sha256") for r in rs} - {None})}
        if any("reference_pass_s" in r for r in rs):
            best_ref = min(rs, key=lambda r: r["reference_pass_s"])
            out[key].update(reference_pass_s=best_ref["reference_pass_s"], reference_phases=best_ref["phases"],
                            reference_spans=best_ref.get("spans", []))
    return out


def report(results: dict, info: dict, args, load_before: tuple, load_after: tuple, out: Path) -> None:
    from train_phases import format_rows, listing, reference_rows, training_rows, trl_rows

    print(f"\nsame tiny LLaVA, {info['n_pairs']} bias-world pairs, batch {args.batch}, LoRA r{LORA['rank']} "
          f"on the LM's linear layers, lr {LR}, {args.steps} steps, 1 process, 1 thread each; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} CPUs)\n")
    print(f"bpo-ray: train.launcher=ray_train (Ray Train's controller and worker process, the reference pass a Ray "
          f"Data job); bpo-ray-local: train.launcher=local and reference.launcher=local (the same training "
          f"function and reference scorer in the calling process, without Ray)\n"
          f"samples/s: from the median step time after 2 warm-up steps, best of {args.repeats} runs; peak RSS: max of "
          "the runs (bpo-ray: the Ray Train worker; bpo-ray-local and TRL: the process). walls, min of the runs: "
          "train wall: from run_training's start, its imports done (driver validation, Ray Train start, worker set-up "
          "with its own imports, steps, checkpoint, export, plot, manifest), TRL's from loading data to the end of "
          "train(); TRL's imports not counted either; incl. imports: run_training with the ray.train and transformers "
          "imports it makes; process wall: the whole run's process from its start (interpreter, imports, bpo-ray's "
          "ray.init and shutdown included); late loss: mean of the last quarter of steps")
    print(f"{'run':<40}{'samples/s':>10}{'peak RSS MB':>13}{'train wall s':>14}{'incl. imports':>15}"
          f"{'process wall s':>16}{'ref pass s':>12}{'loss first->late':>20}")
    for (run, reference), r in results.items():
        with_imports = f"{r['run_training_s']:>15.1f}" if r.get("run_training_s") else f"{'':>15}"
        print(f"{run + ', ref ' + reference:<40}{r['samples_per_s']:>10.2f}{r['peak_rss_mb']:>13.0f}"
              f"{r['wall_s']:>14.1f}{with_imports}{r['process_wall_s']:>16.1f}{r.get('reference_pass_s', 0):>12.1f}"
              f"{r['first_loss']:>10.4f}->{r['late_loss']:.4f}")
    print("\nratios bpo-ray / TRL (same invocation):")
    for run in OURS:
        for reference in ("adapter_disabled", "precomputed"):
            ours, trl = results[(run, reference)], results[("trl", reference)]
            print(f"  {run:<13} ref {reference:<17} train wall x{ours['wall_s'] / trl['wall_s']:.2f} (incl. imports "
                  f"x{ours['run_training_s'] / trl['wall_s']:.2f}), process wall "
                  f"x{ours['process_wall_s'] / trl['process_wall_s']:.2f}, samples/s "
                  f"x{ours['samples_per_s'] / trl['samples_per_s']:.2f}, peak RSS x{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
        ours, trl = results[(run, "precomputed")], results[("trl", "precomputed")]
        print(f"  {run:<13} reference pass: x{ours['reference_pass_s'] / trl['reference_pass_s']:.2f} "
              f"({ours['reference_pass_s']:.1f} s vs {trl['reference_pass_s']:.1f} s inside TRL's already-loaded process)")
    for run in (*OURS, "trl"):
        pre, online = results[(run, "precomputed")], results[(run, "adapter_disabled")]
        print(f"  {run:<13} precomputed / online reference: samples/s x{pre['samples_per_s'] / online['samples_per_s']:.2f}, "
              f"peak RSS x{pre['peak_rss_mb'] / online['peak_rss_mb']:.2f}")
    if "stock_trl_error" in results[("trl", "precomputed")]:
        print(f"  stock TRL with precompute_ref_log_probs=True: {results[('trl', 'precomputed')]['stock_trl_error']}")
    for reference in ("adapter_disabled", "precomputed"):
        digests = sorted({d for run in OURS for d in results[(run, reference)]["adapter_sha256"]})
        print(f"  bpo-ray ref {reference}: adapter sha256 {', '.join(d[:16] for d in digests)} "
              f"({'the same' if len(digests) == 1 else 'DIFFERENT'} over both launchers, {args.repeats} runs each)")
    ref_digests = sorted({d for run in OURS for d in results[(run, "precomputed")]["reference_sha256"]})
    if ref_digests:
        print(f"  bpo-ray reference log-probs sha256 {', '.join(d[:16] for d in ref_digests)} "
              f"({'the same' if len(ref_digests) == 1 else 'DIFFERENT'} over both launchers)")

    print("\nwhere the wall goes (the fastest run of each; CPU s: the process doing that part, where one does)")
    for run in OURS:
        for reference in ("adapter_disabled", "precomputed"):
            r = results[(run, reference)]
            print(format_rows(f"{run} run_training, ref {reference}", training_rows(r["phases"], r["spans"]),
                              r["run_training_s"]))
        r = results[(run, "precomputed")]
        print(format_rows(f"{run} reference pass (run_reference)", reference_rows(r["reference_phases"],
                                                                                   r["reference_spans"]),
                          r["reference_pass_s"]))
    for reference in ("adapter_disabled", "precomputed"):
        r = results[("trl", reference)]
        print(format_rows(f"TRL, ref {reference}", trl_rows(r["phases"]), r["wall_s"]))
    if args.phases:
        for run in OURS:
            for reference in ("adapter_disabled", "precomputed"):
                r = results[(run, reference)]
                print(f"\nevery phase and Ray span, {run} ref {reference} (its fastest run):")
                print(listing(r["phases"], r["spans"]))
    (out / "results.json").write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
