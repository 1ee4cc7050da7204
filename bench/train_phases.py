"""Where bench/train.py's runs spend their wall time: phase tables built from the timelines the
runs record (``bpo_ray.train.timeline``: the driver's and the Ray Train worker's phases, with
CPU seconds and peak RSS) and from Ray's own task trace (``ray.timeline()``: when each Ray Train,
Ray Data and scorer actor ran its constructor and methods).

Every phase is ``[name, start, end, cpu_s, peak_rss_mb]`` with ``time.time()`` start and end, so
phases of different processes line up; Ray's spans are ``[category, start, end]``.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

Phase = list  # [name, start, end, cpu_s, peak_rss_mb]


def ray_spans(since: float, settle_s: float = 1.5) -> list[list]:
    """Ray's task/actor-method spans (``task::<Class>.<method>`` or ``task::<task>``) that began
    after ``since``; waits ``settle_s`` first (task events reach the GCS about once a second)."""
    import ray

    time.sleep(settle_s)
    spans = []
    for event in ray.timeline():
        cat = event.get("cat", "")
        if event.get("ph") == "X" and cat.startswith("task::") and event["ts"] / 1e6 >= since - 1:
            start = event["ts"] / 1e6
            spans.append([cat[len("task::"):], start, start + event["dur"] / 1e6])
    return sorted(spans, key=lambda s: s[1])


def _all(phases: Iterable[Phase], name: str) -> list[Phase]:
    return [p for p in phases if p[0] == name]


def _one(phases: Iterable[Phase], name: str) -> Optional[Phase]:
    found = _all(phases, name)
    return found[0] if found else None


def _wall(phases: Iterable[Phase], *names: str) -> float:
    return sum(p[2] - p[1] for n in names for p in _all(phases, n))


def _cpu(phases: Iterable[Phase], *names: str) -> Optional[float]:
    values = [p[3] for n in names for p in _all(phases, n) if len(p) > 3 and p[3] is not None]
    return sum(values) if values else None


def _span(spans: list[list], suffix: str) -> Optional[list]:
    return next((s for s in spans if s[0].endswith(suffix)), None)


Row = tuple[str, float, Optional[float]]  # label, wall s, CPU s of the process doing it (None: several / n.a.)


def training_rows(phases: list[Phase], spans: list[list]) -> list[Row]:
    """run_training's wall split into consecutive parts (they add up to it), with sub-rows ("  ")."""
    run = _one(phases, "bench.run_training")
    fit, loop = _one(phases, "driver.fit"), _one(phases, "worker.loop")
    if not (run and fit and loop):
        return []
    validation = ("driver.ensure_models", "driver.lora_targets", "driver.processor", "driver.read_pairs",
                  "driver.check_images", "driver.prompt_tokens", "driver.reference_settings")
    rows: list[Row] = [
        ("driver: imports (transformers; ray.train with the ray_train launcher)", _wall(phases, "driver.imports"), _cpu(phases, "driver.imports")),
        ("driver: validation (LoRA targets, processor, pairs read + sort, images, prompt tokens)",
         _wall(phases, *validation), _cpu(phases, *validation)),
        ("driver: Ray attach + storage check", _wall(phases, "driver.ray_init", "driver.storage_check"), None),
        ("launcher start: fit() (local: the call) until the loop runs", loop[1] - fit[1], None),
    ]
    controller = _span(spans, "TrainController.__init__")
    created = _one(phases, "worker.process_to_loop")
    if controller:
        rows.append(("  controller process start (spawn, imports)", controller[1] - fit[1], None))
    if created and controller:
        rows.append(("  controller: coordinator, placement group, worker spawn", created[1] - controller[1], None))
    if created:
        rows.append(("  worker process: Ray worker start, torch import, process group, train fn",
                     created[2] - created[1], created[3]))
    setup = ("worker.import_deepspeed", "worker.load_model", "worker.apply_lora", "worker.deepspeed_initialize",
             "worker.read_pairs")
    rows.append(("worker: set-up", _wall(phases, "worker.setup"), _cpu(phases, "worker.setup")))
    for name, label in zip(setup, ("import deepspeed", "model + processor load (transformers import)",
                                   "LoRA wrap", "deepspeed.initialize", "read pairs")):
        rows.append((f"  {label}", _wall(phases, name), _cpu(phases, name)))
    steps = _all(phases, "worker.steps")
    ckpt = ("worker.checkpoint_deepspeed", "worker.checkpoint_adapter", "worker.export_adapter",
            "worker.persist_checkpoint", "worker.report_checkpoint")
    rows += [
        (f"worker: {len(steps)} steps (+ logging between them)", loop[2] - _wall(phases, *ckpt) - _one(
            phases, "worker.setup")[2], _cpu(phases, "worker.steps")),
        ("  the steps alone", _wall(phases, "worker.steps"), _cpu(phases, "worker.steps")),
        ("worker: checkpoint, adapter export, report (upload)", _wall(phases, *ckpt), _cpu(phases, *ckpt)),
        ("launcher finish: loop returned until fit() (the call) returns", fit[2] - loop[2], None),
        ("driver: after fit (plot, manifest)", run[2] - fit[2], None),
    ]
    return rows


def reference_rows(phases: list[Phase], spans: list[list]) -> list[Row]:
    """The reference pass's wall split into consecutive parts (Ray Data's from its task trace)."""
    whole, data = _one(phases, "bench.reference_pass"), _one(phases, "reference.ray_data")
    in_process = _one(phases, "reference.score_in_process")
    if whole and in_process:  # reference.launcher=local: the scorer in the calling process
        before = ("reference.read_pairs", "reference.check_images", "reference.ensure_models", "reference.plan")
        return [("driver: read pair footers, image checks, models, plan", in_process[1] - whole[1],
                 _cpu(phases, *before)),
                ("scorer in this process (model load, forward passes, Parquet writes)", in_process[2] - in_process[1],
                 _cpu(phases, "reference.score_in_process")),
                ("driver: model digest, manifest", whole[2] - in_process[2], None)]
    if not (whole and data):
        return []
    before = ("reference.read_pairs", "reference.check_images", "reference.ensure_models", "reference.ray_init",
              "reference.plan")
    rows: list[Row] = [
        ("driver: read pairs, image checks, models, Ray attach, dataset from the rows", data[1] - whole[1],
         _cpu(phases, *before)),
        ("Ray Data job (scoring, to_arrow_refs)", data[2] - data[1], None),
    ]
    init = _span(spans, "ReferenceScorer)).__init__")
    batches = [s for s in spans if s[0].endswith("ReferenceScorer)).submit")]
    writes = [s for s in spans if s[0] == "Write"]  # the Ray Data write stage, before the driver wrote
    if init:
        rows.append(("  executor start, helper actors, scorer actor process start", init[1] - data[1], None))
        rows.append(("  scorer constructor (torch + transformers imports, model load)", init[2] - init[1], None))
        rows.append(("  scorer ready until the job ends", data[2] - init[2], None))
    if batches:
        rows.append((f"    scorer batches ({len(batches)}): forward passes", sum(s[2] - s[1] for s in batches), None))
    if writes:
        rows.append(("    Parquet write tasks", sum(s[2] - s[1] for s in writes), None))
    rows.append(("driver: write Parquet, model digest, manifest", whole[2] - data[2], None))
    return rows


def trl_rows(phases: list[Phase]) -> list[Row]:
    names = [("trl.data", "data: pairs to a datasets.Dataset (images decoded)"),
             ("trl.load_model", "model + processor load"), ("trl.trainer_init", "DPOTrainer construction"),
             ("trl.reference_pass", "reference pass (patched in)"), ("trl.train", "trainer.train()")]
    return [(label, _wall(phases, n), _cpu(phases, n)) for n, label in names if _one(phases, n)]


def format_rows(title: str, rows: list[Row], total: Optional[float] = None) -> str:
    lines = [title, f"  {'':<98}{'wall s':>8}{'CPU s':>8}"]
    for label, wall, cpu in rows:
        lines.append(f"  {label:<98}{wall:>8.2f}{'' if cpu is None else f'{cpu:8.2f}'}")
    if total is not None:
        lines.append(f"  {'total':<98}{total:>8.2f}")
    return "\n".join(lines)


def listing(phases: list[Phase], spans: list[list]) -> str:
    """Every phase and Ray span of one run, in start order, offsets from the first."""
    steps = [p for p in phases if p[0] == "worker.steps"]
    merged = [p for p in phases if p[0] != "worker.steps"]
    if steps:
        merged.append(["worker.steps (all)", steps[0][1], steps[-1][2], sum(p[3] or 0 for p in steps), steps[-1][4]])
    rows = [(p[1], p[2], p[0], p[3] if len(p) > 3 else None, p[4] if len(p) > 4 else None) for p in merged]
    rows += [(s[1], s[2], "ray: " + s[0], None, None) for s in spans if s[2] - s[1] >= 0.05]
    t0 = min(r[0] for r in rows)
    out = []
    for start, end, name, cpu, rss in sorted(rows):
        extra = ("" if cpu is None else f"  cpu {cpu:6.2f}") + ("" if rss is None else f"  peak RSS {rss:5.0f} MB")
        out.append(f"  {start - t0:7.2f} -> {end - t0:7.2f}  {end - start:6.2f}  {name[:80]}{extra}")
    return "\n".join(out)
