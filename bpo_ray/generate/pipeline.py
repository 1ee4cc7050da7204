"""The generate job: source items -> Ray Data stages -> resumable pair/quarantine shards + manifest.

::

    scan_source (Ray Data tasks: chunks -> counts, id registry; the driver holds no records)
      -> emit_items (tasks: records -> item blocks, whole shards) -> load_images (tasks; bad images quarantined)
      -> ImageWeakenedSampler / JudgeRankedSampler   (autoscaling actor pools)
      -> ErrorInjector (actors) | ray.data.llm vLLM processor
      -> build_outcomes (tasks: filters, pair rows)
      -> driver: group by shard, commit each shard atomically (ShardStore), manifest

Every row (quarantined ones too) flows through every stage, so each shard's outcome count is
known exactly and a shard is committed the moment its last item arrives.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from typing import Any, Optional

from bpo_ray import storage
from bpo_ray.config import BPOConfig
from bpo_ray.config.generate import PoolConfig
from bpo_ray.generate.error_injection import ErrorInjector, error_injection_processor
from bpo_ray.generate.image_loader import load_images
from bpo_ray.generate.image_weakened import ImageWeakenedSampler
from bpo_ray.generate.judge_ranked import JudgeRankedSampler
from bpo_ray.generate.on_policy import OnPolicySampler, resolve_synonyms
from bpo_ray.generate.pairs import build_outcomes
from bpo_ray.generate.shards import ShardStore, total_counts
from bpo_ray.generate.ingest import SourceIndex, scan_source
from bpo_ray.generate.sources import ITEM_COLUMNS, list_source_files
from bpo_ray.raycluster import worker_runtime_env
from bpo_ray.schemas import Manifest, library_versions, write_manifest

IMAGE_STRATEGIES = ("image_weakened", "judge_ranked", "on_policy")
# Settings that may change between a run and its resume (they do not change what is generated).
RUNTIME_ONLY = ("progress", "io_num_cpus", "outcome_tasks", "ingest")


# Groups of work per actor below which a pool does not start another actor up front (model
# load costs seconds; a tiny run is done before a second actor would be up).
GROUPS_PER_ACTOR = 4


def initial_pool_size(pool: PoolConfig, n_groups: Optional[int]) -> int:
    """Actors a pool starts with: enough for ``n_groups`` generation groups (``GROUPS_PER_ACTOR``
    each), within ``min_size..max_size``; ``min_size`` when the amount of work is unknown.

    Starting at ``min_size`` and letting Ray Data scale up costs a whole actor start (process,
    imports, model load) on the critical path: Ray Data asks for the second actor only once the
    first is up and its queue is full (measured: the second sampler actor was requested 20.7 s
    after the first, on the 2-core box at load average 18-30)."""
    if not n_groups:
        return pool.min_size
    return max(pool.min_size, min(pool.max_size, -(-n_groups // GROUPS_PER_ACTOR)))


# CPUs the initial actors leave free for the task stages (emit, the streaming repartition, which
# takes Ray Data's default of one CPU a task, load_images before a GPU pool, build_outcomes).
TASK_CPUS = 1.0


def initial_pool_sizes(pools: list[tuple[str, PoolConfig]], n_groups: Optional[int],
                       free: dict[str, float]) -> dict[str, int]:
    """Actors each pool starts with: ``initial_pool_size`` each, as far as ``free`` resources
    (``ray.available_resources()`` when the stages are built) hold them with ``TASK_CPUS`` to spare.

    Actors beyond ``min_size`` are added one at a time across the pools, in pipeline order, while
    they fit. Without the cap a run could start actors on every CPU: Ray Data starts a pool's
    initial actors whatever its resource budget, and the task stages between them then wait for a
    CPU that never frees (seen on the two-node test cluster: three 1-CPU samplers and a 0.5-CPU
    injector on 4 CPUs, the repartition task pending for good). Ray Data's own scaling up later
    checks the budget, so a pool still grows to ``max_size`` as resources allow."""
    sizes = {name: pool.min_size for name, pool in pools}
    wanted = {name: initial_pool_size(pool, n_groups) for name, pool in pools}
    cpus = free.get("CPU", 0.0) - TASK_CPUS - sum(pool.min_size * pool.num_cpus for _, pool in pools)
    gpus = free.get("GPU", 0.0) - sum(pool.min_size * pool.num_gpus for _, pool in pools)
    grew = True
    while grew:
        grew = False
        for name, pool in pools:
            if sizes[name] < wanted[name] and pool.num_cpus <= cpus + 1e-9 and pool.num_gpus <= gpus + 1e-9:
                sizes[name] += 1
                cpus -= pool.num_cpus
                gpus -= pool.num_gpus
                grew = True
    return sizes


def pool_kwargs(pool: PoolConfig, initial_size: Optional[int] = None) -> dict[str, Any]:
    """``map_batches`` arguments for an autoscaling actor pool with fault tolerance, started at
    ``initial_size`` actors (``min_size`` when not given; ``initial_pool_sizes``)."""
    import ray

    kwargs: dict[str, Any] = dict(
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                           initial_size=initial_size or pool.min_size),
        batch_size=pool.batch_size, num_cpus=pool.num_cpus,
    )
    if pool.num_gpus > 0:
        kwargs["num_gpus"] = pool.num_gpus
    # Ray Data's actor pools already default to max_restarts=-1, max_task_retries=-1 (a killed
    # actor is replaced and its batches retried); only pass other values, through the
    # deprecated ray_remote_args path that is the one way to set them in Ray 2.60.
    if pool.max_restarts != -1:
        kwargs["max_restarts"] = pool.max_restarts
    if pool.max_task_retries != -1:
        kwargs["max_task_retries"] = pool.max_task_retries
    return kwargs


def _plan(cfg: BPOConfig, source: str, images: Optional[str], index: SourceIndex) -> dict:
    gen = cfg.generate.model_dump(mode="json")
    for key in RUNTIME_ONLY:
        gen.pop(key)
    for section in ("sampler", "injector", "judge_ranked", "on_policy"):
        gen[section].pop("pool")
    gen["judge_ranked"].pop("judge_token_env")
    gen["on_policy"]["verifier"].pop("judge_token_env")
    return {"source": source, "images": images,
            "models": {"mllm": cfg.models.mllm, "text_llm": cfg.models.text_llm, "dtype": cfg.models.dtype},
            "generate": gen, **index.plan_fields()}


def _model_source(uri: str) -> str:
    return uri if storage.is_remote(uri) or not os.path.exists(os.path.expanduser(uri)) \
        else os.path.abspath(os.path.expanduser(uri))


def strategy_pools(gen) -> dict[str, PoolConfig]:
    """Each strategy's actor pool, in pipeline order (the image stages, then error injection)."""
    return {"image_weakened": gen.sampler.pool, "judge_ranked": gen.judge_ranked.pool,
            "on_policy": gen.on_policy.pool, "error_injection": gen.injector.pool}


def generation_group_size(cfg: BPOConfig) -> int:
    """Items a model generates for in one batch: the smallest batch of the pools in use."""
    gen = cfg.generate
    return min(pool.batch_size for name, pool in strategy_pools(gen).items() if name in gen.strategies)


def group_blocks(items: list[dict[str, Any]], shard_size: int, group_size: int) -> list:
    """``items`` (in order) as Arrow tables, one per generation group, with a ``group`` column.

    A group is ``group_size`` consecutive items of one shard, fixed by their position: every run
    and every resume batches the same items together, so generation does not depend on how Ray
    Data schedules blocks (``rows.rows_by_group``). One block a group also keeps the stream
    moving: a shard commits as soon as its last item arrives.
    """
    import pyarrow as pa

    per_shard = -(-shard_size // group_size)
    rows = [{**item, "group": item["shard"] * per_shard + (item["order"] % shard_size) // group_size}
            for item in items]
    table = pa.Table.from_pylist(rows)
    blocks, start = [], 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or rows[end]["group"] != rows[start]["group"]:
            blocks.append(table.slice(start, end - start))
            start = end
    return blocks


def build_dataset(items: list[dict[str, Any]], cfg: BPOConfig, synonyms: Optional[dict[str, str]] = None):
    """The lazy Ray Data pipeline for in-memory ``items``; its rows are ``order, shard, outcome, result``.

    ``synonyms`` is the on-policy verifier's object vocabulary (read once on the driver)."""
    import ray

    return generation_stages(ray.data.from_arrow(group_blocks(items, cfg.generate.shard_size,
                                                              generation_group_size(cfg))), cfg, synonyms)


# Rows per pair-building task, at most: it is row-wise (no generation groups), and one Ray task
# per 8-item group cost more (scheduling, a worker's first-call imports, Arrow conversion) than the
# filters it ran. Never more than a shard (``outcome_batch_rows``), so a shard still commits at
# most one shard's worth of rows after its last item is generated.
OUTCOME_BATCH_ROWS = 64


def outcome_batch_rows(cfg: BPOConfig) -> int:
    """Rows per ``build_outcomes`` task: a shard, capped at ``OUTCOME_BATCH_ROWS``, at least a group."""
    return max(generation_group_size(cfg), min(OUTCOME_BATCH_ROWS, cfg.generate.shard_size))


def image_loading_args(cfg: BPOConfig, first_pool: Optional[PoolConfig], runtime_env: Optional[dict]) -> dict:
    """Ray remote arguments of the ``load_images`` stage.

    Before a CPU-only actor pool (``first_pool``, the first image stage's), the stage asks for the
    pool's own CPU request: with equal remote arguments Ray Data fuses it into the actor's call, so
    an item's image is read and checked in the process that encodes it, with no Ray task, object
    and scheduling round per generation group. Before a GPU pool (or fault-tolerance settings an
    actor pool has and a task cannot) it stays a separate task stage of ``io_num_cpus``, so image
    I/O never holds a GPU actor."""
    args: dict[str, Any] = {"num_cpus": cfg.generate.io_num_cpus}
    if (first_pool is not None and first_pool.num_gpus == 0 and first_pool.max_restarts == -1
            and first_pool.max_task_retries == -1):
        args["num_cpus"] = first_pool.num_cpus
    if runtime_env:
        args["runtime_env"] = runtime_env
    return args


def generation_stages(ds, cfg: BPOConfig, synonyms: Optional[dict[str, str]] = None,
                      n_groups: Optional[int] = None):
    """Images, negatives and outcomes for a dataset of item rows (``ITEM_COLUMNS`` + ``group``);
    ``synonyms``: the on-policy verifier's object vocabulary; ``n_groups``: generation groups to
    process (sizes the actor pools at start, ``initial_pool_sizes``)."""
    import ray

    gen, models = cfg.generate, cfg.models
    strategies = list(gen.strategies)
    image_stages = [s for s in IMAGE_STRATEGIES if s in strategies]
    io_batch = generation_group_size(cfg)
    runtime_env = worker_runtime_env(cfg.numerics)
    pool_of = strategy_pools(gen)
    ds = ds.map_batches(load_images, fn_kwargs=dict(max_bytes=gen.max_image_bytes, keep_bytes=bool(image_stages)),
                        batch_size=io_batch,
                        **image_loading_args(cfg, pool_of[image_stages[0]] if image_stages else None, runtime_env))
    common = dict(dtype=models.dtype, device=models.device, cache_dir=models.cache_dir,
                  cpu_isa=cfg.numerics.cpu_isa)
    in_use = [(name, pool) for name, pool in pool_of.items() if name in strategies]
    if gen.injector.backend != "transformers":  # the vLLM processor starts its own actors at min_size
        in_use = [(name, pool.model_copy(update={"max_size": pool.min_size}) if name == "error_injection" else pool)
                  for name, pool in in_use]
    sizes = initial_pool_sizes(in_use, n_groups, ray.available_resources() if n_groups else {})
    pools = {name: dict(pool_kwargs(pool, sizes.get(name)), runtime_env=runtime_env) for name, pool in pool_of.items()}
    for stage in image_stages:
        drop = stage == image_stages[-1]
        if stage == "image_weakened":
            ds = ds.map_batches(ImageWeakenedSampler, **pools["image_weakened"], fn_constructor_kwargs=dict(
                model_uri=models.mllm, backend=gen.sampler.backend, noise=gen.sampler.noise.model_dump(),
                sampling=gen.sampler.sampling.model_dump(), seed=gen.seed, engine_kwargs=gen.sampler.engine_kwargs,
                drop_image_bytes=drop, **common))
        elif stage == "on_policy":
            ds = ds.map_batches(OnPolicySampler, **pools["on_policy"], fn_constructor_kwargs=dict(
                model_uri=models.mllm, backend=gen.sampler.backend, on_policy=gen.on_policy.model_dump(),
                synonyms=synonyms or {}, seed=gen.seed, engine_kwargs=gen.sampler.engine_kwargs,
                drop_image_bytes=drop, **common))
        else:
            ds = ds.map_batches(JudgeRankedSampler, **pools["judge_ranked"], fn_constructor_kwargs=dict(
                model_uri=models.mllm, backend=gen.sampler.backend, judge=gen.judge_ranked.model_dump(),
                seed=gen.seed, engine_kwargs=gen.sampler.engine_kwargs, drop_image_bytes=drop, **common))
    if "error_injection" in strategies:
        inj = gen.injector
        if inj.backend == "transformers":
            ds = ds.map_batches(ErrorInjector, **pools["error_injection"], fn_constructor_kwargs=dict(
                model_uri=models.text_llm, sampling=inj.sampling.model_dump(), seed=gen.seed, **common))
        else:
            keep = list(ITEM_COLUMNS) + ["group", "image_sha256"] + [f"neg_{s}" for s in image_stages]
            processor = error_injection_processor(
                models.text_llm, _model_source(models.text_llm), inj.sampling, gen.seed, inj.pool, keep,
                inj.engine_kwargs, cache_dir=models.cache_dir, io_num_cpus=gen.io_num_cpus, runtime_env=runtime_env)
            ds = processor(ds)
    # at most outcome_tasks at once: each further one in flight makes Ray start a worker process
    return ds.map_batches(build_outcomes, fn_kwargs=dict(strategies=strategies, filters=gen.filters.model_dump()),
                          batch_size=outcome_batch_rows(cfg), num_cpus=gen.io_num_cpus,
                          compute=ray.data.TaskPoolStrategy(size=gen.outcome_tasks), runtime_env=runtime_env)


def _consume(ds, store: ShardStore, expected: dict[int, int], progress: bool) -> None:
    """Stream results, committing each shard as soon as all of its ``expected[shard]`` items have arrived."""
    from bpo_ray.progress import progress as report_progress

    buffers: dict[int, dict[int, dict]] = defaultdict(dict)
    tally: Counter = Counter()
    bar = report_progress(total=sum(expected.values()), unit="item", desc="generate", disable=not progress,
                          dynamic_ncols=True)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for order, shard, outcome, result in zip(batch["order"], batch["shard"], batch["outcome"], batch["result"]):
            # Buffered as the JSON text (a third of the parsed dicts' memory) until the shard is whole.
            buffers[int(shard)][int(order)] = result
            tally[outcome] += 1
            tally["pairs"] += 0 if outcome == "quarantined" else len(json.loads(result)["pairs"])
            bar.update(1)
            if len(buffers[int(shard)]) == expected[int(shard)]:
                store.commit(int(shard), [dict(json.loads(res), order=o) for o, res in buffers.pop(int(shard)).items()])
                tally["shards"] += 1
        bar.set_postfix(pairs=tally["pairs"], filtered=tally["filtered"], quarantined=tally["quarantined"],
                        shards=f"{tally['shards']}/{len(expected)}")
    bar.close()
    if buffers:
        missing = {s: expected[s] - len(b) for s, b in buffers.items()}
        raise RuntimeError(f"pipeline ended with incomplete shards (shard: missing items) {missing}")


def _models_needed(strategies) -> list[str]:
    """The ``ModelsConfig`` fields the strategies load: the injector the text LLM, the rest the MLLM."""
    return sorted({"text_llm" if s == "error_injection" else "mllm" for s in strategies})


def run_generate(cfg: BPOConfig, source: str, out: str, images: Optional[str] = None,
                 restart: bool = False) -> Manifest:
    """Run (or resume) the generate stage; returns the manifest also written to ``out``."""
    from ray.data import DataContext

    from bpo_ray.models.ensure import ensure_models
    from bpo_ray.raycluster import init_ray

    gen = cfg.generate
    if "judge_ranked" in gen.strategies and not gen.judge_ranked.judge_url:
        raise ValueError("strategy judge_ranked needs generate.judge_ranked.judge_url (an OpenAI-compatible base URL)")
    synonyms = None
    if "on_policy" in gen.strategies:
        ver = gen.on_policy.verifier
        if ver.kind == "judge" and not ver.judge_url:
            raise ValueError("strategy on_policy with verifier judge needs generate.on_policy.verifier.judge_url")
        if gen.on_policy.adapter and not storage.exists(gen.on_policy.adapter):
            raise ValueError(f"generate.on_policy.adapter {gen.on_policy.adapter!r} does not exist")
        synonyms = resolve_synonyms(ver.synonyms, source)
    t0 = time.perf_counter()
    list_source_files(source)  # a missing source is a clear error before any cluster starts
    # before Ray starts; absolute local paths for the workers
    cfg = cfg.model_copy(update={"models": ensure_models(cfg.models, _models_needed(gen.strategies), cfg.name, "generate")})
    init_ray(cfg.ray)
    DataContext.get_current().enable_progress_bars = False
    runtime_env = worker_runtime_env(cfg.numerics)
    index = scan_source(source, images, gen.max_text_chars, gen.max_items, gen.sample_items, gen.seed,
                        chunk_bytes=max(1, int(gen.ingest.chunk_mb * 2**20)), id_partitions=gen.ingest.id_partitions,
                        num_cpus=gen.io_num_cpus, runtime_env=runtime_env)
    try:
        n_shards = index.n_shards(gen.shard_size)
        store = ShardStore(out)
        if restart:
            store.clear()
        store.check_or_write_plan(_plan(cfg, source, images, index))
        done = store.done_shards()
        expected = index.shard_sizes(gen.shard_size, done)
        t_read = time.perf_counter() - t0
        if expected:
            group = generation_group_size(cfg)
            items = index.dataset(gen.shard_size, group, done, gen.io_num_cpus, runtime_env,
                                  emit_tasks=gen.ingest.emit_tasks, object_store_mb=gen.ingest.object_store_mb)
            n_groups = sum(-(-n // group) for n in expected.values())
            _consume(generation_stages(items, cfg, synonyms, n_groups), store, expected, gen.progress)
    finally:
        index.close()
    n_run = sum(expected.values())
    t_total = time.perf_counter() - t0
    counts = total_counts(store.iter_markers(), expected_items=index.n_items)
    new_pairs = sum(m["pairs_written"] for m in store.iter_markers() if m["shard"] not in done)
    run_s = max(t_total - t_read, 1e-9)
    manifest = Manifest(
        stage="generate", counts=counts,
        config={"source": source, "images": images, "out": out, "models": cfg.models.model_dump(mode="json"),
                "generate": gen.model_dump(mode="json"), "ray": cfg.ray.model_dump(mode="json")},
        versions=library_versions(),
        timings={"total_s": t_total, "read_s": t_read, "items_this_run": float(n_run),
                 "items_per_s": n_run / run_s if n_run else 0.0,
                 "pairs_per_s": new_pairs / run_s if n_run else 0.0,
                 "shards": float(n_shards), "shards_resumed": float(len(done & set(range(n_shards))))},
    )
    write_manifest(manifest, storage.join(out, "manifest.json"))
    return manifest
