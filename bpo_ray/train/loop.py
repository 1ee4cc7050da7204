"""The per-worker training loop that Ray Train runs on every worker (read it top to bottom).

Each worker loads the MLLM, wraps it with LoRA, hands it to DeepSpeed (ZeRO-2/3, a plain torch
AdamW), and then, step by step: takes its slice of the global batch, runs chosen and rejected
through one forward pass, gets reference log-probs from the pairs (precomputed) or from the same
model with the adapter off, and optimises the preference loss (or SFT on the chosen answers).

State lives in Ray Train checkpoints (``train/checkpoint.py``): DeepSpeed's engine state (LoRA weights and optimizer
shards), the consolidated adapter, and ``state.json`` (step, data position, schedule). A restarted
worker group, or the same job submitted again, continues from the latest one; with a different
number of workers (elastic resize) the adapter and position carry over and the optimizer moments
start afresh, because ZeRO's optimizer shards are laid out per worker.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any, Optional

import torch

from bpo_ray import numerics, storage
from bpo_ray.config.shared import ModelsConfig
from bpo_ray.config.train import TrainConfig
from bpo_ray.train.checkpoint import DS_TAG, TrainState, download_dir, load_adapter_weights, resume_point, save_adapter
from bpo_ray.train.collectives import all_reduce_max, all_reduce_sum, broadcast
from bpo_ray.train.data import PairShare, TrainData, epoch_share, total_samples
from bpo_ray.train.lean_imports import lean_process
from bpo_ray.train.logprobs import collate_pairs, forward_logps
from bpo_ray.train.lora import apply_lora, reference_model
from bpo_ray.train.losses import PreferenceLoss, dpo_with_sft, sft_loss
from bpo_ray.train.metrics_log import MetricsLog, peak_rss_mb
from bpo_ray.train.schedule import WarmupCosine
from bpo_ray.train.timeline import Timeline, process_start_time
from bpo_ray.train.validation import BestAdapter, batches, chosen_drop, summarise

FAIL_AT_STEP_ENV = "BPO_RAY_TRAIN_FAIL_AT_STEP"  # tests: kill one worker once at this step


def _maybe_fail(step: int, rank: int, world: int, out_uri: str) -> None:
    """Test hook: the last worker process dies (hard exit) once, at the start of ``step``."""
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    if not fail_at or int(fail_at) != step or rank != world - 1:
        return
    marker = storage.join(out_uri, f".injected-failure-step-{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"worker {rank} killed at step {step}\n")
    print(f"[bpo-ray train] injected failure: worker {rank} exits at step {step}", file=sys.stderr, flush=True)
    os._exit(1)


def _micro_step(engine, dataset: PairShare, rows, train: TrainConfig, loss_fn, device, dtype,
                use_reference_columns: bool, counters: dict) -> tuple[torch.Tensor, dict]:
    pad_id = dataset.processor.tokenizer.pad_token_id
    encoded = [dataset.encode(int(i)) for i in rows]
    n = len(encoded)
    if train.mode == "sft":
        batch = collate_pairs(encoded, pad_id, with_rejected=False)
        seq, tok, mask = forward_logps(engine, batch, train.average_logp, device, dtype)
        loss = sft_loss(tok, mask)
        return loss, {"loss": loss.item() * n, "chosen_logp": seq.detach().sum().item(), "n": n}

    batch = collate_pairs(encoded, pad_id, with_rejected=True)
    seq, tok, mask = forward_logps(engine, batch, train.average_logp, device, dtype)
    chosen, rejected = seq[:n], seq[n:]
    refs = dataset.reference_logps([int(i) for i in rows]) if use_reference_columns else None
    if refs is None:
        with torch.no_grad(), reference_model(engine.module):
            ref_seq, _, _ = forward_logps(engine.module, batch, train.average_logp, device, dtype)
        ref_chosen, ref_rejected = ref_seq[:n], ref_seq[n:]
        counters["ref_forwards"] += 1
    else:
        ref_chosen = torch.tensor(refs[0], dtype=seq.dtype, device=seq.device)
        ref_rejected = torch.tensor(refs[1], dtype=seq.dtype, device=seq.device)
    out = loss_fn(chosen, rejected, ref_chosen, ref_rejected)
    loss, chosen_nll = dpo_with_sft(out.losses, tok, mask, train.sft_weight)
    extra = {} if chosen_nll is None else {"chosen_nll": chosen_nll.item() * n}
    margin = out.chosen_rewards - out.rejected_rewards
    return loss, {
        **extra,
        "loss": out.losses.detach().sum().item(),
        "reward_margin": margin.sum().item(),
        "reward_accuracy": (margin > 0).float().sum().item(),
        "chosen_reward": out.chosen_rewards.sum().item(),
        "rejected_reward": out.rejected_rewards.sum().item(),
        "chosen_logp": chosen.detach().sum().item(),
        "rejected_logp": rejected.detach().sum().item(),
        "ref_chosen_logp": ref_chosen.detach().sum().item(),
        "ref_rejected_logp": ref_rejected.detach().sum().item(),
        "n": n,
    }


def _validate(engine, dataset: PairShare, train: TrainConfig, loss_fn, device, dtype, use_reference_columns: bool,
              rank: int, world: int) -> dict:
    """Held-out metrics (``val_*``, see ``validation.py``): each rank scores its share with the
    training step's code under ``no_grad`` (an SFT run scores the DPO quantities too), then the sums
    are all-reduced and rank 0's means broadcast, so every rank decides alike."""
    as_dpo = train if train.mode == "dpo" else train.model_copy(update={"mode": "dpo", "sft_weight": 0.0})
    sums: dict[str, float] = {}
    engine.eval()  # no dropout, and no RNG draws: training's random stream is left as it was
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for rows in batches(len(dataset), world, rank, train.per_device_batch_size):
                _, stats = _micro_step(engine, dataset, rows or [0], as_dpo, loss_fn, device, dtype,
                                       use_reference_columns, {"ref_forwards": 0})
                for k, v in stats.items():  # a rank whose share ran out ran a throwaway batch
                    sums[k] = sums.get(k, 0.0) + (v if rows else 0.0)
    finally:
        engine.train()
    keys = sorted(sums)
    return broadcast(summarise(dict(zip(keys, all_reduce_sum([sums[k] for k in keys], device)))))


def train_loop_per_worker(config: dict[str, Any], session: Optional[Any] = None) -> list[list]:
    """The training function; ``config`` comes from ``bpo_ray.train.trainer.run_training``.
    Ray Train calls it in each worker (``session`` None: a ``RaySession``); the local launcher
    calls it in its own process with a ``LocalSession`` (``bpo_ray.train.session``).

    Returns this worker's ``Timeline`` (JSON): where its wall time went (Ray Train hands rank 0's
    to the driver as ``Result.return_value``). The worker runs without the packages it would
    import and never use (``lean_imports``: triton on a CPU, pandas where not imported yet)."""
    with lean_process(use_gpu=bool(config["train"].get("use_gpu", False))):
        return _train_loop(config, session)


def _train_loop(config: dict[str, Any], session: Optional[Any]) -> list[list]:
    timeline = Timeline()
    loop_started, loop_cpu = time.time(), time.process_time()
    created = process_start_time()
    if session is None:
        from bpo_ray.train.session import RaySession

        session = RaySession()
        if created is not None and created < loop_started:  # Ray worker start, imports, process group
            timeline.add("process_to_loop", created, loop_started, cpu_s=loop_cpu)
    started = time.perf_counter()
    train = TrainConfig.model_validate(config["train"])
    models = ModelsConfig.model_validate(config["models"])
    data = TrainData(**config["pairs"])
    out_uri: str = config["out"]
    rank, world = session.rank, session.world
    numerics.check(config.get("numerics", {}).get("cpu_isa", "native"), where=f"train worker {rank}")
    device = session.device
    dtype = torch.bfloat16 if train.precision == "bf16" else None

    t0 = time.perf_counter()
    with timeline.phase("import_deepspeed"):
        from bpo_ray.train.zero import import_deepspeed

        deepspeed = import_deepspeed()  # no shared-memory op build, no TorchInductor for Muon
    deepspeed_import_s = time.perf_counter() - t0

    from bpo_ray.models.loading import load_mllm

    torch.manual_seed(train.seed)
    t0 = time.perf_counter()
    with timeline.phase("load_model"):
        model, processor = load_mllm(models.mllm, dtype=models.dtype, device=str(device), cache_dir=models.cache_dir)
    processor.tokenizer.padding_side = "right"
    with timeline.phase("apply_lora"):
        policy = apply_lora(model, train.lora)
    policy.train()
    model_load_s = time.perf_counter() - t0

    state = TrainState(world_size=world)
    restore_dir: Optional[str] = None
    resume = resume_point(session.latest_checkpoint(), out_uri, rank)
    resume_source = None
    if resume is not None:
        resume_source, fs, path = resume
        restore_dir = tempfile.mkdtemp(prefix="bpo-restore-")
        download_dir(fs, path, restore_dir)
        state = TrainState.from_json(open(os.path.join(restore_dir, "state.json")).read())
        if state.world_size != world:  # elastic resize: adapter and position carry over
            load_adapter_weights(policy, os.path.join(restore_dir, "adapter"))

    from bpo_ray.train.zero import fill_deepspeed_config

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=train.lr,
                                  weight_decay=train.weight_decay)
    t0 = time.perf_counter()
    with timeline.phase("deepspeed_initialize"):
        engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                               config=fill_deepspeed_config(config["deepspeed"], train, world))
    deepspeed_init_s = time.perf_counter() - t0
    resumed_from = None
    if restore_dir is not None:
        if state.world_size == world:
            engine.load_checkpoint(os.path.join(restore_dir, "deepspeed"), tag=DS_TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        resumed_from = state.step
        shutil.rmtree(restore_dir, ignore_errors=True)
    state.world_size = world

    micro = train.per_device_batch_size
    global_micro = micro * world
    dataset = PairShare(data.train_uri, data.train_rows, processor, train.max_length)
    loaded_epoch = None

    def load_share() -> None:
        """Hold this rank's rows of the epoch the next step takes from (at the start, on resume
        and at each epoch's end): the seeded order decides them, so nothing else is read."""
        nonlocal loaded_epoch
        epoch, rows = epoch_share(state.position, len(dataset), global_micro, train.seed, rank, micro)
        if epoch != loaded_epoch:
            with timeline.phase("read_pairs"):
                dataset.load(rows)
            loaded_epoch = epoch

    load_share()
    step_samples = global_micro * train.grad_accum
    total = total_samples(len(dataset), train.epochs)
    if total < step_samples:
        raise ValueError(f"{len(dataset)} pairs x {train.epochs} epochs = {total} samples cannot fill one "
                         f"optimizer step of {step_samples} (batch {micro} x accum {train.grad_accum} x {world} workers)")
    schedule = WarmupCosine(train.lr, train.warmup_ratio, total)
    state.scheduler = schedule.state_dict()
    steps_total = state.step + (total - state.position.samples_seen) // step_samples
    if train.max_steps:
        steps_total = min(steps_total, train.max_steps)
    loss_fn = PreferenceLoss(train.loss, train.beta, train.label_smoothing) if train.mode == "dpo" else None
    counters = {"ref_forwards": 0}
    val_cfg = train.validation
    val_dataset = None
    if val_cfg.enabled:
        val_dataset = PairShare(data.held_out_uri, data.held_out_rows, processor, train.max_length)
        mine = [i for rows in batches(len(val_dataset), world, rank, micro) for i in rows]
        val_dataset.load(mine + [0])  # row 0: a rank whose share ran out runs a throwaway batch on it
    best = BestAdapter(val_cfg, out_uri) if val_cfg.enabled and val_cfg.keep_best else None
    if best is not None and resume is not None:  # an earlier attempt's best stays a candidate
        best.record = broadcast(best.load() if rank == 0 else None)

    log = MetricsLog(storage.join(out_uri, "metrics.jsonl")) if rank == 0 else None
    if log:
        log.write({"event": "start", "time": time.time(), "world_size": world, "resumed_from_step": resumed_from,
                   "resumed_from": resume_source,
                   "steps_total": steps_total, "pairs": len(dataset), "share_rows": len(dataset.loaded),
                   "share_row_groups": dataset.row_groups_read, "reference": "precomputed"
                   if config["use_reference_columns"] else "adapter_disabled",
                   "deepspeed_import_s": round(deepspeed_import_s, 3), "deepspeed_init_s": round(deepspeed_init_s, 3),
                   "model_load_s": round(model_load_s, 3), "worker_start_s": round(time.perf_counter() - started, 3),
                   **({"held_out_pairs": len(val_dataset)} if val_dataset is not None else {})})
    progress = None
    if rank == 0:
        from bpo_ray.progress import progress as report_progress

        progress = report_progress(total=steps_total, initial=state.step, desc=f"{train.mode} (ZeRO-{train.zero_stage}, {world} workers)",
                        file=sys.stderr, mininterval=5.0)

    def checkpoint_and_report(metrics: dict, final: bool = False) -> None:
        tmp = tempfile.mkdtemp(prefix="bpo-ckpt-")
        with timeline.phase("checkpoint_deepspeed"):
            engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=True)
        with timeline.phase("checkpoint_adapter"):
            save_adapter(engine.module, os.path.join(tmp, "adapter"), rank, train.zero_stage, models.mllm)
        if rank == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                f.write(state.to_json())
            with timeline.phase("export_adapter"):
                if final and best is not None and best.record is not None:  # the best validated adapter
                    storage.upload_dir(os.path.join(tmp, "adapter"), storage.join(out_uri, "adapter_last"))
                    storage.copy_tree(best.adapter_uri(best.record), storage.join(out_uri, "adapter"))
                elif final:
                    storage.upload_dir(os.path.join(tmp, "adapter"), storage.join(out_uri, "adapter"))
            log.flush()
        with timeline.phase("report_checkpoint"):  # to OUT/checkpoints/ (Ray Train's upload, or ours)
            session.report(metrics, checkpoint_dir=tmp, step=state.step)
        shutil.rmtree(tmp, ignore_errors=True)

    val_loss_fn = loss_fn or PreferenceLoss(train.loss, train.beta, train.label_smoothing)

    def validate(metrics: dict) -> bool:
        """Held-out metrics into ``metrics``, the collapse check, the best adapter; True: stop."""
        t0 = time.perf_counter()
        val = _validate(engine, val_dataset, train, val_loss_fn, device, dtype, config["use_reference_columns"],
                        rank, world)
        warn, stop, warning = chosen_drop(val_cfg, val, state.step)
        metrics.update(val, val_collapse=warn)
        if stop:
            metrics["stopped"] = "collapse"
        value = val[f"val_{val_cfg.metric}"]
        if best is not None and best.improves(value):
            tmp = tempfile.mkdtemp(prefix="bpo-best-")
            save_adapter(engine.module, tmp, rank, train.zero_stage, models.mllm)  # ZeRO-3: every rank gathers
            if rank == 0:
                best.save(tmp, state.step, value)
            best.record = broadcast(best.record)
            shutil.rmtree(tmp, ignore_errors=True)
        if best is not None and best.record is not None:
            metrics.update(val_best_step=best.record.step, val_best=best.record.value)
        metrics["val_time_s"] = time.perf_counter() - t0
        if rank == 0:
            line = (f"validation step {state.step} ({val['val_pairs']} held-out pairs): acc "
                    f"{val['val_reward_accuracy']:.2f} loss {val['val_loss']:.4f} margin {val['val_reward_margin']:.4f} "
                    f"logp vs reference: chosen {val['val_chosen_logp_delta']:+.2f} rejected "
                    f"{val['val_rejected_logp_delta']:+.2f}")
            if best is not None:
                line += f"; best {val_cfg.metric} {best.record.value:.4f} at step {best.record.step}"
            print(f"[bpo-ray train] {line}", flush=True)
            if warning:
                print(f"[bpo-ray train] {warning}", file=sys.stderr, flush=True)
        return stop

    timeline.add("setup", loop_started, cpu_s=time.process_time() - loop_cpu)
    while state.step < steps_total:
        _maybe_fail(state.step + 1, rank, world, out_uri)
        t_step = time.perf_counter()
        step_started, step_cpu = time.time(), time.process_time()
        lr = schedule.lr_at(state.position.samples_seen + step_samples)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        for _ in range(train.grad_accum):
            load_share()
            rows = state.position.take(len(dataset), global_micro, train.seed)[rank * micro:(rank + 1) * micro]
            loss, stats = _micro_step(engine, dataset, rows, train, loss_fn, device, dtype,
                                      config["use_reference_columns"], counters)
            engine.backward(loss)
            engine.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        state.step += 1
        keys = sorted(sums)
        reduced = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], device)))
        n = reduced.pop("n")
        elapsed = time.perf_counter() - t_step
        timeline.add("steps", step_started, cpu_s=time.process_time() - step_cpu)
        metrics = {k: v / n for k, v in reduced.items()}
        metrics.update(step=state.step, epoch=state.position.epoch, samples_seen=state.position.samples_seen,
                       lr=lr, samples_per_s=step_samples / elapsed, step_time_s=elapsed, world_size=world,
                       ref_forwards=counters["ref_forwards"], mode=train.mode,
                       peak_rss_mb=all_reduce_max(peak_rss_mb(), device))
        validated = val_dataset is not None and (state.step % val_cfg.every_steps == 0 or state.step == steps_total)
        stop = validated and validate(metrics)
        final = state.step == steps_total or stop
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if log and (state.step % train.log_every == 0 or final or validated):
            log.write({"time": time.time(), **metrics})
            line = (f"step {state.step}/{steps_total} loss {metrics['loss']:.4f} lr {lr:.2e} "
                    f"{metrics['samples_per_s']:.2f} samples/s")
            if train.mode == "dpo":
                line += (f" margin {metrics['reward_margin']:.4f} acc {metrics['reward_accuracy']:.2f}"
                         f" logp chosen {metrics['chosen_logp']:.2f} rejected {metrics['rejected_logp']:.2f}")
            print(f"[bpo-ray train] {line}", flush=True)
        # Metrics reach the session with each checkpoint and each validation only: ray.train.report
        # synchronises every worker with the controller (about 1.8 s per call on 2 CPU cores,
        # 10-20x a tiny model's step), while the metrics file and the console above get every step.
        if state.step % train.checkpoint_every == 0 or final:
            checkpoint_and_report(metrics, final=final)  # the last one exports the adapter
        elif validated:
            session.report(metrics)
        if stop:
            break
    if progress is not None:
        progress.close()
    timeline.add("loop", loop_started, cpu_s=time.process_time() - loop_cpu)
    return timeline.to_json()
