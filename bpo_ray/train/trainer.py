"""The train stage's driver: validate everything that can be checked up front, run Ray Train's
``TorchTrainer`` (DeepSpeed ZeRO inside each worker; with ``train.launcher: local`` the same
training function in this process), then write the run's outputs.

Output layout under ``out`` (local or ``s3://``)::

    adapter/          PEFT LoRA adapter (safetensors): PeftModel.from_pretrained and vLLM LoRA; with
                      train.validation.keep_best, the best validated step's
    adapter_last/     the last step's adapter (only with train.validation.keep_best)
    validation/       best.json + best-step-<k>/adapter, held_out_pairs.json (train.validation on)
    train_data/       train.parquet (+ held_out.parquet): the kept pairs in canonical order, the
                      copy workers read their shares from (data.write_training_data)
    checkpoints/      checkpoints (DeepSpeed state, adapter, state.json); resume point
    metrics.jsonl     one record per step (+ start events), written by rank 0
    logps.png         chosen/rejected log-probs over training (paper Figure 6)
    manifest.json     counts (pairs in = trained on + dropped + held out), config, versions, timings,
                      and under config.validation which step's adapter was exported
    dropped_pairs.json  ids of pairs left out, by reason (only when some were)
    merged/           the adapter merged into the base model (train.merge)

Submitting the same job again (same ``out``) continues from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from bpo_ray import numerics, storage
from bpo_ray.config import BPOConfig
from bpo_ray.config.shared import ModelsConfig, NumericsConfig
from bpo_ray.config.train import LoraConfig, TrainConfig
from bpo_ray.raycluster import worker_runtime_env
from bpo_ray.schemas import Manifest, ManifestCounts, library_versions, read_manifest
from bpo_ray.train.data import (PairsError, PreparedPairs, pairs_location, read_pairs, select_pairs,
                                write_training_data)
from bpo_ray.train.checkpoint import CHECKPOINTS_DIR
from bpo_ray.train.local_launch import check_single_process, local_worker
from bpo_ray.train.lean_imports import lean_process
from bpo_ray.train.loop import FAIL_AT_STEP_ENV, train_loop_per_worker
from bpo_ray.train.lora import resolve_targets
from bpo_ray.train.plots import plot_logps, read_metrics
from bpo_ray.train.ray_settings import controller_settings, start_autoscaling_coordinator
from bpo_ray.train.session import LocalSession
from bpo_ray.train.timeline import Timeline, phase_seconds
from bpo_ray.train.validation import VALIDATION_DIR, summary as validation_summary
from bpo_ray.train.zero import load_deepspeed_template

RUN_NAME = CHECKPOINTS_DIR


@dataclass
class TrainResult:
    out: str
    steps: int
    final_metrics: dict
    adapter: str
    merged: Optional[str]
    prepared: PreparedPairs
    reference: str  # "precomputed" or "adapter_disabled"
    wall_s: float
    validation: Optional[dict] = None  # validation.summary(): exported step, collapse warnings
    timeline: Timeline = field(default_factory=Timeline)  # driver phases and rank 0's ("worker." ...)


def check_lora_targets(model_path: str, lora: LoraConfig) -> list[str]:
    """Resolve LoRA targets on an empty (meta-device) copy of the model: no weights are read."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(AutoConfig.from_pretrained(model_path))
    return resolve_targets(model, lora)


def check_reference_settings(pairs_uri: str, train: TrainConfig, models: ModelsConfig,
                             model_path: Optional[str] = None) -> None:
    """Precomputed reference log-probs must come from the model training starts from (with LoRA the
    reference is the policy with its adapter disabled), in the same dtype, scored the same way.

    The model's identity is the sha256 of its weights when both sides have a local checkpoint
    (``model_path``: training's resolved ``models.mllm``), else the configured URI.
    """
    from bpo_ray.models.checkpoint import local_weights_sha256
    from bpo_ray.models.ensure import absolute_if_local

    manifest_uri = storage.join(pairs_location(pairs_uri).rsplit("/pairs", 1)[0], "manifest.json")
    if not storage.exists(manifest_uri):
        return  # produced elsewhere (e.g. another tool): trusted as given
    manifest = read_manifest(manifest_uri)
    settings = manifest.config.get("reference_settings")
    if manifest.stage != "reference" or not settings:
        return
    expected = {"average_logp": train.average_logp, "max_length": train.max_length, "dtype": models.dtype}
    ours = local_weights_sha256(model_path or models.mllm)
    if settings.get("model_sha256") and ours:
        expected["model_sha256"] = ours
    else:  # a remote model on either side, or a manifest written before model_sha256 was recorded
        expected["model"] = absolute_if_local(models.mllm)
        settings = {**settings, "model": absolute_if_local(settings.get("model") or "")}
    wrong = {k: (settings.get(k), v) for k, v in expected.items() if settings.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: pairs have {a!r}, train has {b!r}" for k, (a, b) in wrong.items())
        raise PairsError(f"reference log-probs in {pairs_uri} were computed with other settings ({detail}); "
                         "rerun `bpo-ray reference` or set train.use_precomputed_reference=false")


def _worker_extra_env() -> dict[str, str]:
    """Variables every training worker gets besides ``raycluster.worker_env``."""
    extra = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get(FAIL_AT_STEP_ENV):
        extra[FAIL_AT_STEP_ENV] = os.environ[FAIL_AT_STEP_ENV]
    return extra


def _run_config(train: TrainConfig, out_uri: str, numerics_cfg: Optional[NumericsConfig] = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.filesystem(out_uri)
    return RunConfig(
        name=RUN_NAME,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
        worker_runtime_env=worker_runtime_env(numerics_cfg, **_worker_extra_env()),
    )


def run_training(cfg: BPOConfig, pairs_uri: str, out_uri: str) -> TrainResult:
    """Train (DPO or SFT per ``cfg.train.mode``) on the pairs at ``pairs_uri``; outputs go to ``out_uri``."""
    entered, entered_cpu = time.time(), time.process_time()
    # with the local launcher this process trains: without the packages it would import and never use
    with lean_process(use_gpu=cfg.train.use_gpu) if cfg.train.launcher == "local" else contextlib.nullcontext():
        return _run_training(cfg, pairs_uri, out_uri, entered, entered_cpu)


def _run_training(cfg: BPOConfig, pairs_uri: str, out_uri: str, entered: float, entered_cpu: float) -> TrainResult:
    timeline = Timeline()
    local = cfg.train.launcher == "local"
    if not local:  # the local launcher runs without Ray (bpo_ray.train.local_launch)
        import ray.train  # noqa: F401  (Ray Train's import, timed with the driver's others)
    from transformers import AutoProcessor

    from bpo_ray.models.ensure import ensure_models
    from bpo_ray.models.loading import resolve_model_path
    from bpo_ray.raycluster import check_cluster_can_write, init_ray

    timeline.add("driver.imports", entered, cpu_s=time.process_time() - entered_cpu)
    started = time.perf_counter()
    with timeline.phase("driver.ensure_models"):
        cfg = cfg.model_copy(update={"models": ensure_models(cfg.models, ["mllm"], cfg.name, "train")})
    train, models = cfg.train, cfg.models
    if local:  # the loop will run in this process: one worker, computing with the kernels the config pins
        check_single_process()
        numerics.check(cfg.numerics.cpu_isa, where="the train driver (train.launcher=local runs the loop in it)")
    if train.lora.train_projector and not train.merge:
        print("bpo-ray train: note: an adapter with projector LoRA loads in PEFT but not as a vLLM LoRA "
              "adapter; set train.merge=true to also get a merged model vLLM can serve", file=sys.stderr)
    template = load_deepspeed_template(train)
    model_path = resolve_model_path(models.mllm, models.cache_dir)
    with timeline.phase("driver.lora_targets"):
        check_lora_targets(model_path, train.lora)
    with timeline.phase("driver.processor"):
        processor = AutoProcessor.from_pretrained(model_path)
    with timeline.phase("driver.read_pairs"):
        table = read_pairs(pairs_uri)
    prepared = select_pairs(table, pairs_uri, processor, train.max_length, strategies=train.strategies,
                            noise_steps=train.noise_steps, validation=train.validation, timeline=timeline)
    use_reference_columns = train.mode == "dpo" and train.use_precomputed_reference and prepared.reference
    if use_reference_columns:
        with timeline.phase("driver.reference_settings"):
            check_reference_settings(pairs_uri, train, models, model_path)

    validated_s = time.perf_counter() - started
    if not local:
        with timeline.phase("driver.ray_init"):
            init_ray(cfg.ray)
            start_autoscaling_coordinator()  # the controller waits for it: let it start alongside
        with timeline.phase("driver.storage_check"):
            run_config = _run_config(train, out_uri, cfg.numerics)
            check_cluster_can_write(out_uri, run_config.worker_runtime_env)
    with timeline.phase("driver.write_train_data"):
        data = write_training_data(table, prepared, out_uri)
    del table  # the workers read their shares of the copy; the driver keeps the counts and ids
    config = {
        "train": train.model_dump(mode="json"),
        "models": models.model_dump(mode="json"),
        "pairs": asdict(data),
        "deepspeed": template,
        "out": out_uri,
        "use_reference_columns": use_reference_columns,
    }
    fit_started = time.perf_counter()
    if local:  # this process is the one worker: no Ray (bpo_ray.train.local_launch)
        worker_vars = worker_runtime_env(cfg.numerics, **_worker_extra_env())["env_vars"]
        with timeline.phase("driver.fit"), local_worker(worker_vars, threads=1, use_gpu=train.use_gpu):
            session = LocalSession(out_uri, train.checkpoints_to_keep, train.use_gpu)
            worker_json = train_loop_per_worker(config, session)
        final_metrics = session.last_metrics
    else:
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
            run_config=run_config,
        )
        with timeline.phase("driver.fit"), controller_settings(train.poll_interval_s):
            result = trainer.fit()
        final_metrics, worker_json = dict(result.metrics or {}), result.return_value
    fit_s = time.perf_counter() - fit_started
    worker_timeline = Timeline.from_json(worker_json)
    worker_timings = _worker_timings(timeline, worker_timeline)

    records = read_metrics(storage.join(out_uri, "metrics.jsonl"))
    with timeline.phase("driver.plot"):
        plot_logps(records, storage.join(out_uri, "logps.png"),
                   title=f"{train.mode.upper()} ({train.loss if train.mode == 'dpo' else 'NLL'}, beta={train.beta})")
    merged = None
    if train.merge:
        with timeline.phase("driver.merge"):
            merged = _merge(cfg, out_uri, in_process=local)
    if prepared.dropped:
        storage.write_text(storage.join(out_uri, "dropped_pairs.json"), json.dumps(prepared.dropped, indent=2))
    validation = None
    by_reason = {k: len(v) for k, v in prepared.dropped.items()}
    if prepared.held_out:
        validation = validation_summary(train.validation, out_uri, records, len(prepared.held_out))
        storage.write_text(storage.join(out_uri, VALIDATION_DIR, "held_out_pairs.json"),
                           json.dumps(prepared.held_out_ids, indent=2))
        by_reason["held_out"] = len(prepared.held_out)
    wall = time.perf_counter() - started
    manifest = Manifest(
        stage="train",
        counts=ManifestCounts(items_in=prepared.num_pairs, paired=len(prepared.keep), filtered=sum(by_reason.values()),
                              by_reason=by_reason),
        config={**cfg.model_dump(mode="json"), "pairs": pairs_uri,
                "reference": "precomputed" if use_reference_columns else "adapter_disabled",
                **({"validation": validation} if validation else {})},
        versions=library_versions(),
        timings={"wall_s": round(wall, 3), "validate_s": round(validated_s, 3), "fit_s": round(fit_s, 3),
                 **phase_seconds(timeline), **worker_timings},
    )
    with timeline.phase("driver.manifest"):
        storage.write_text(storage.join(out_uri, "manifest.json"), manifest.model_dump_json(indent=2))
    return TrainResult(
        out=out_uri,
        steps=int(final_metrics.get("step", records[-1]["step"] if records else 0)),
        final_metrics=final_metrics,
        adapter=storage.join(out_uri, "adapter"),
        merged=merged,
        prepared=prepared,
        reference="precomputed" if use_reference_columns else "adapter_disabled",
        wall_s=wall,
        validation=validation,
        timeline=Timeline(timeline.phases + worker_timeline.prefixed("worker.").phases),
    )


def _worker_timings(driver: Timeline, worker: Timeline) -> dict[str, float]:
    """Rank 0's phases as ``worker.<phase>_s``, and Ray Train's own share of ``fit`` around them:
    ``ray_train.start_s`` (``fit`` called until the loop started: controller, placement group,
    worker process, imports, process group) and ``ray_train.finish_s`` (loop returned until
    ``fit`` returned: the controller noticing, worker group shutdown)."""
    out = phase_seconds(worker, prefix="worker.")
    fit_start, fit_end = driver.start_of("driver.fit"), driver.end_of("driver.fit")
    loop_start, loop_end = worker.start_of("loop"), worker.end_of("loop")
    if None not in (fit_start, fit_end, loop_start, loop_end):
        out["ray_train.start_s"] = round(loop_start - fit_start, 3)
        out["ray_train.finish_s"] = round(fit_end - loop_end, 3)
    return out


def _merge(cfg: BPOConfig, out_uri: str, in_process: bool = False) -> str:
    """Merge in a Ray task, so a big model's merge runs on a worker node, not the job driver (in
    this process with ``train.launcher: local``, which trained here too)."""
    from bpo_ray.train.export import export_merged

    args = (cfg.models.mllm, storage.join(out_uri, "adapter"), storage.join(out_uri, "merged"), cfg.models.dtype,
            cfg.models.cache_dir)
    if in_process:
        return export_merged(*args)
    import ray

    return ray.get(ray.remote(num_cpus=1)(export_merged).remote(*args))
