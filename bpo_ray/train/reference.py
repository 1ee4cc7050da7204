"""The reference pass: a Ray Data job that adds ``ref_chosen_logp``/``ref_rejected_logp`` to every
pair, computed by the base model exactly as training computes the policy's log-probs (same
prompt format, answer-token mask, truncation, sum or average). Training on its output skips the
reference forward pass entirely (Li et al. 2024 precomputes them the same way); TRL refuses this for
vision datasets.

Pairs whose prompt leaves no room for an answer within ``train.max_length`` keep null reference
log-probs and are counted in the manifest (training drops them too).

No pair passes through the driver: it checks the pairs' files from their footers (schema, nulls,
row counts: ``pair_files``) and their image and strategy columns alone (``check_pair_columns``),
cuts the rows into units (``plan_units``), and an actor pool of ``ReferenceScorer`` reads each
unit from the files, scores it block by block and writes it as ``OUT/pairs/part-<unit>.parquet``.
Blocks are cut where they always were (every ``4 x reference.batch_size`` rows of the files read
in order), so the log-probs do not depend on the number of actors or units. With
``reference.launcher: local`` one ``ReferenceScorer`` scores the same units in the driver's
process, without Ray, with the threads a scorer actor gets, and writes the same log-probs. The
manifest's timings split the driver's wall into phases (``read_pairs``, ``check_images``,
``plan``, ``ray_data`` or ``score_in_process``, ...).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bpo_ray import storage
from bpo_ray.config import BPOConfig
from bpo_ray.schemas import (Manifest, ManifestCounts, PAIR_SCHEMA, STRATEGIES, SchemaError, check_pairs, library_versions,
                             write_parquet)
from bpo_ray.train.data import PairsError, check_images_exist, pairs_location, row_group_starts
from bpo_ray.train.timeline import Timeline, phase_seconds, process_start_time


def pair_files(location: str) -> list[tuple[str, int]]:
    """The Parquet files of the pairs at ``location`` (sorted, as ``read_pairs`` reads them) and
    their row counts, checked from their footers alone: the pair schema (columns and types), nulls
    in a non-null column (from the row groups' statistics; files without statistics are checked
    batch by batch while scoring), and at least one row."""
    if not storage.exists(location):
        raise PairsError(f"no pairs at {location}: path does not exist")
    files = storage.list_files(location, ".parquet")
    if not files:
        raise PairsError(f"no pairs at {location}: no .parquet files")
    out = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise PairsError(f"{uri}: cannot read Parquet: {exc}") from exc
        try:
            check_pairs(meta.schema.to_arrow_schema().empty_table(), f"pairs file {uri}")
        except SchemaError as exc:
            raise PairsError(f"pairs do not match the pair schema: {exc}") from exc
        names = meta.schema.to_arrow_schema().names
        for field in PAIR_SCHEMA:
            if field.nullable:
                continue
            col = names.index(field.name)
            nulls = sum((meta.row_group(g).column(col).statistics.null_count or 0)
                        for g in range(meta.num_row_groups)
                        if meta.row_group(g).column(col).statistics is not None)
            if nulls:
                raise PairsError(f"pairs do not match the pair schema: pairs file {uri}: column "
                                 f"'{field.name}' has {nulls} nulls")
        out.append((uri, meta.num_rows))
    if not sum(n for _, n in out):
        raise PairsError(f"no pairs at {location}: the Parquet files hold 0 rows")
    return out


def check_pair_columns(files: list[tuple[str, int]], max_listed: int = 5) -> None:
    """Known ``strategy`` values and ``check_images_exist``, reading the ``image``, ``id`` and
    ``strategy`` columns alone, file by file: the driver holds the distinct image URIs, not the pairs."""
    images: dict[str, str] = {}  # uri -> the first pair id naming it
    strategies: set[str] = set()
    for uri, _ in files:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["image", "id", "strategy"], batch_size=65536):
                strategies.update(batch.column(2).to_pylist())
                for image, pair in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    images.setdefault(image, pair)
    unknown = sorted(strategies - set(STRATEGIES))
    if unknown:
        raise PairsError(f"pairs do not match the pair schema: unknown strategy values {unknown} "
                         f"(known: {STRATEGIES})")
    check_images_exist(pa.table({"image": list(images), "id": list(images.values())}), max_listed)


def plan_units(files: list[tuple[str, int]], block_rows: int, blocks_per_unit: int) -> list[list[tuple[str, int, int]]]:
    """The rows of ``files`` (in order, as one table) cut into units of ``blocks_per_unit`` blocks
    of ``block_rows`` rows; a unit is a list of ``(file, first row, rows)`` parts (a unit may span
    files). Block boundaries fall every ``block_rows`` rows of the files read in order (as one
    table), whatever the units, so which pairs share a scorer batch (and so its padding) follows
    the files' row order alone."""
    unit_rows = block_rows * blocks_per_unit
    units, current, room = [], [], unit_rows
    for uri, n in files:
        first = 0
        while first < n:
            take = min(room, n - first)
            current.append((uri, first, take))
            first, room = first + take, room - take
            if room == 0:
                units.append(current)
                current, room = [], unit_rows
    if current:
        units.append(current)
    return units


def read_unit(parts: list[tuple[str, int, int]]) -> pa.Table:
    """The rows a unit names, read from the row groups that hold them."""
    tables = []
    for uri, first, rows in parts:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            starts = row_group_starts(reader.metadata)
            groups = [g for g in range(reader.metadata.num_row_groups)
                      if starts[g] < first + rows and starts[g + 1] > first]
            table = reader.read_row_groups(groups)
            tables.append(table.slice(int(first - starts[groups[0]]), rows))
    return check_pairs(pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0],
                       "reference pass input")


class ReferenceScorer:
    """Ray Data actor (or, with ``reference.launcher: local``, an object in the driver): the base
    MLLM scoring units of pairs. Each unit is read from the pairs'
    files, scored block by block, and written as ``OUT/pairs/part-<unit>.parquet``; the actor
    returns one small row per unit (rows, unscored), so no pair passes through the driver."""

    def __init__(self, models: dict[str, Any], max_length: int, average_logp: bool, micro_batch: int,
                 block_rows: int, out_pairs: str, cpu_isa: str = "native", in_process: bool = False):
        self.timeline = Timeline()
        created = None if in_process else process_start_time()
        if created is not None:  # the Ray worker's start and this module's imports (torch among them)
            self.timeline.add("process_start", created)
        with self.timeline.phase("imports"):
            import torch

            from bpo_ray import numerics
            from bpo_ray.config.shared import ModelsConfig
            from bpo_ray.models.loading import load_mllm

            numerics.check(cpu_isa, where="reference scorer")

        cfg = ModelsConfig.model_validate(models)
        with self.timeline.phase("load_model"):  # transformers' own imports land here
            self.model, self.processor = load_mllm(cfg.mllm, dtype=cfg.dtype, device=cfg.device,
                                                   cache_dir=cfg.cache_dir)
        self.device = next(self.model.parameters()).device
        self.dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
        self.max_length, self.average_logp, self.micro_batch = max_length, average_logp, micro_batch
        self.block_rows, self.out_pairs = block_rows, out_pairs
        self._images: dict[str, Any] = {}
        print("[bpo-ray reference] scorer ready: " + ", ".join(
            f"{p.name} {p.end - p.start:.2f} s" for p in self.timeline.phases), file=sys.stderr, flush=True)

    def _image(self, uri: str, pair_id: str):
        from bpo_ray.images import ImageError, load_image

        if uri not in self._images:
            if len(self._images) > 256:
                self._images.clear()
            try:
                self._images[uri] = load_image(uri)[0]
            except ImageError as exc:
                raise PairsError(f"pair {pair_id}: image {uri}: {exc}") from exc
        return self._images[uri]

    def __call__(self, units: pa.Table) -> pa.Table:
        out = {"unit": [], "rows": [], "unscored": []}
        for unit, parts in zip(units.column("unit").to_pylist(), units.column("parts").to_pylist()):
            table = read_unit([tuple(p) for p in json.loads(parts)])
            scored = pa.concat_tables([self.score_block(table.slice(at, self.block_rows))
                                       for at in range(0, table.num_rows, self.block_rows)])
            write_parquet(scored, storage.join(self.out_pairs, f"part-{unit:06d}.parquet"), PAIR_SCHEMA,
                          what="reference pass output")
            out["unit"].append(unit)
            out["rows"].append(scored.num_rows)
            out["unscored"].append(scored.column("ref_chosen_logp").null_count)
        return pa.table(out)

    def score_block(self, batch: pa.Table) -> pa.Table:
        """``batch`` with its reference log-probs, in micro-batches of ``micro_batch`` pairs."""
        import torch

        from bpo_ray.train.logprobs import PromptTooLong, collate_pairs, encode_pair, forward_logps

        rows = batch.to_pylist()
        chosen: list = [None] * len(rows)
        rejected: list = [None] * len(rows)
        encoded = []
        for i, row in enumerate(rows):
            try:
                enc = encode_pair(self.processor, self._image(row["image"], row["id"]), row["prompt"],
                                  row["chosen"], row["rejected"], self.max_length)
            except PromptTooLong:
                continue
            encoded.append((i, enc))
        pad_id = self.processor.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(encoded), self.micro_batch):
                part = encoded[start:start + self.micro_batch]
                collated = collate_pairs([e for _, e in part], pad_id, with_rejected=True)
                seq, _, _ = forward_logps(self.model, collated, self.average_logp, self.device, self.dtype)
                n = len(part)
                for (i, _), c, r in zip(part, seq[:n].tolist(), seq[n:].tolist()):
                    chosen[i], rejected[i] = c, r
        table = batch.drop_columns(["ref_chosen_logp", "ref_rejected_logp"])
        table = table.append_column("ref_chosen_logp", pa.array(chosen, pa.float64()))
        table = table.append_column("ref_rejected_logp", pa.array(rejected, pa.float64()))
        return check_pairs(table, "reference pass output")


def blocks_per_unit(total_rows: int, block_rows: int, num_actors: int, most: int = 64) -> int:
    """Blocks per unit: about four units per actor, at most ``most`` blocks (a unit is one output
    file), so small sets still spread over the actors and large ones do not make tiny files."""
    blocks = -(-total_rows // block_rows)
    return max(1, min(most, -(-blocks // (4 * num_actors))))


def reference_settings(cfg: BPOConfig) -> dict[str, Any]:
    """What the reference log-probs depend on; training checks its own settings against these
    (``trainer.check_reference_settings``). ``model_sha256`` is the weights' identity for a local
    checkpoint (None for a remote one: the URI identifies it)."""
    from bpo_ray.models.checkpoint import local_weights_sha256

    return {"model": cfg.models.mllm, "model_sha256": local_weights_sha256(cfg.models.mllm), "dtype": cfg.models.dtype,
            "max_length": cfg.train.max_length, "average_logp": cfg.train.average_logp}


def run_reference(cfg: BPOConfig, pairs_uri: str, out_uri: str, timeline: Optional[Timeline] = None) -> Manifest:
    """Score every pair at ``pairs_uri`` with the base model; write ``out_uri/pairs`` + manifest.

    ``timeline`` (optional) gets the driver's phases; the manifest's timings hold them too."""
    from bpo_ray.models.loading import pick_device
    from bpo_ray.train.lean_imports import lean_process

    # with the local launcher this process scores: without the packages it would import and never use
    with lean_process(use_gpu=pick_device(cfg.models.device).type == "cuda") if cfg.reference.launcher == "local" \
            else contextlib.nullcontext():
        return _run_reference(cfg, pairs_uri, out_uri, timeline)


def _run_reference(cfg: BPOConfig, pairs_uri: str, out_uri: str, timeline: Optional[Timeline]) -> Manifest:
    from bpo_ray.models.ensure import ensure_models
    from bpo_ray.raycluster import check_cluster_can_write, init_ray, worker_runtime_env

    timeline = timeline if timeline is not None else Timeline()
    started = time.perf_counter()
    source = pairs_location(pairs_uri)
    out_pairs = storage.join(out_uri, "pairs")
    if storage.filesystem(source)[1].rstrip("/") == storage.filesystem(out_pairs)[1].rstrip("/"):
        raise PairsError("--out must differ from --pairs (the reference pass writes a new pairs set)")
    with timeline.phase("read_pairs"):  # footers: schema, nulls, row counts; fail fast, no pair read
        files = pair_files(source)
    total = sum(n for _, n in files)
    with timeline.phase("check_images"):
        check_pair_columns(files)

    with timeline.phase("ensure_models"):
        cfg = cfg.model_copy(update={"models": ensure_models(cfg.models, ["mllm"], cfg.name, "reference")})
    ref = cfg.reference
    block_rows = ref.batch_size * 4
    local = ref.launcher == "local"
    if not local:
        with timeline.phase("ray_init"):
            init_ray(cfg.ray)
        with timeline.phase("storage_check"):  # the scorers write the output, with the nodes' credentials
            check_cluster_can_write(out_uri, worker_runtime_env(cfg.numerics))
    with timeline.phase("plan"):
        units = plan_units(files, block_rows, blocks_per_unit(total, block_rows, ref.num_actors))
        if storage.exists(out_pairs):
            storage.delete(out_pairs)
        # one block per unit, so the units spread over the actor pool
        blocks = [pa.table({"unit": [k], "parts": [json.dumps(parts)]}) for k, parts in enumerate(units)]
    scorer_kwargs = {"models": cfg.models.model_dump(mode="json"), "max_length": cfg.train.max_length,
                     "average_logp": cfg.train.average_logp, "micro_batch": ref.batch_size, "block_rows": block_rows,
                     "out_pairs": out_pairs, "cpu_isa": cfg.numerics.cpu_isa}
    if local:  # the same scorer and units, in this process
        from bpo_ray.train.local_launch import torch_threads

        # the threads a scorer actor gets (Ray's OMP_NUM_THREADS: its whole CPUs), so the bits agree
        with timeline.phase("score_in_process"), torch_threads(max(1, int(ref.num_cpus))):
            scorer = ReferenceScorer(**scorer_kwargs, in_process=True)
            done = pa.concat_tables([scorer(block) for block in blocks])
    else:
        import ray

        # from_blocks reads the blocks' metadata here instead of starting a remote task per block
        ds = ray.data.from_blocks(blocks).map_batches(
            ReferenceScorer,
            fn_constructor_kwargs=scorer_kwargs,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ref.num_actors),
            num_cpus=ref.num_cpus,
            num_gpus=ref.num_gpus,
            runtime_env=worker_runtime_env(cfg.numerics),
        )
        with timeline.phase("ray_data"):  # executor start, scorer actors (start, model load), units
            done = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    if sorted(done.column("unit").to_pylist()) != list(range(len(units))) or pc.sum(done.column("rows")).as_py() != total:
        raise PairsError(f"reference pass scored {pc.sum(done.column('rows')).as_py()} pairs in "
                         f"{done.num_rows} units for {total} pairs in {len(units)} units")
    unscored = pc.sum(done.column("unscored")).as_py()
    with timeline.phase("reference_settings"):  # hashes the model's weights
        settings = reference_settings(cfg)
    manifest = Manifest(
        stage="reference",
        counts=ManifestCounts(items_in=total, paired=total - unscored, filtered=unscored, pairs_written=total,
                              by_reason={"prompt_too_long": unscored} if unscored else {}),
        config={"reference_settings": settings, "pairs": pairs_uri,
                "reference": cfg.reference.model_dump(mode="json")},
        versions=library_versions(),
        timings={"wall_s": round(time.perf_counter() - started, 3), **phase_seconds(timeline)},
    )
    storage.write_text(storage.join(out_uri, "manifest.json"), manifest.model_dump_json(indent=2))
    return manifest
