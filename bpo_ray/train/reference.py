"""The reference pass: a Ray Data job that adds ``ref_chosen_logp``/``ref_rejected_logp`` to every
pair, computed by the base model exactly as training computes the policy's log-probs (same
prompt format, answer-token mask, truncation, sum or average). Training on its output skips the
reference forward pass entirely (Li et al. 2024 precomputes them the same way); TRL refuses this for
vision datasets.

Pairs whose prompt leaves no room for an answer within ``train.max_length`` keep null reference
log-probs and are counted in the manifest (training drops them too).

The driver reads and checks the pairs, hands them to Ray Data in blocks of one scorer batch
(``scorer_blocks``), an actor pool of ``ReferenceScorer`` scores them, and the driver writes
``OUT/pairs/pairs.parquet`` in the input's row order (``write_scored``). The manifest's timings
split the driver's wall into phases (``read_pairs``, ``plan``, ``ray_data``, ``write``, ...).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import pyarrow as pa

from bpo_ray import storage
from bpo_ray.config import BPOConfig
from bpo_ray.schemas import Manifest, ManifestCounts, PAIR_SCHEMA, check_pairs, library_versions, write_parquet
from bpo_ray.train.data import PairsError, check_images_exist, pairs_location, read_pairs
from bpo_ray.train.timeline import Timeline, phase_seconds, process_start_time


class ReferenceScorer:
    """Ray Data actor: the base MLLM scoring batches of pairs (Arrow tables in, Arrow tables out)."""

    def __init__(self, models: dict[str, Any], max_length: int, average_logp: bool, micro_batch: int,
                 cpu_isa: str = "native"):
        self.timeline = Timeline()
        created = process_start_time()
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

    def __call__(self, batch: pa.Table) -> pa.Table:
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


def scorer_blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """``table`` cut into Ray Data blocks of ``rows`` rows (the scorers' batch size), in order.

    The driver has read and checked every pair already, so the Ray Data job starts from these
    rows instead of reading the files again (no list/read tasks, no Parquet footer-reader actors
    competing with the scorers' start). Each block is one scorer batch, so which pairs share a
    batch (and so its padding) follows the files' row order alone.
    """
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def write_scored(scored: pa.Table, table: pa.Table, out_pairs: str) -> pa.Table:
    """Write the scored pairs as ``out_pairs/pairs.parquet`` (replacing what was there), in the
    input's row order; returns the table written.

    The driver writes them: it holds every pair already, and a Ray Data write stage would start
    a task worker (and Ray Data's Parquet datasink in it) after the last batch, for one file."""
    import pyarrow.compute as pc

    scored = check_pairs(scored, "reference pass output")
    if scored.num_rows != table.num_rows:
        raise PairsError(f"reference pass scored {scored.num_rows} pairs for {table.num_rows} read")
    position = pc.index_in(scored.column("id"), value_set=table.column("id"))
    scored = scored.take(pc.sort_indices(position))
    if storage.exists(out_pairs):
        storage.delete(out_pairs)
    write_parquet(scored, storage.join(out_pairs, "pairs.parquet"), PAIR_SCHEMA, what="reference pass output")
    return scored


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
    import ray

    from bpo_ray.models.ensure import ensure_models
    from bpo_ray.raycluster import init_ray, worker_runtime_env

    timeline = timeline if timeline is not None else Timeline()
    started = time.perf_counter()
    source = pairs_location(pairs_uri)
    out_pairs = storage.join(out_uri, "pairs")
    if storage.filesystem(source)[1].rstrip("/") == storage.filesystem(out_pairs)[1].rstrip("/"):
        raise PairsError("--out must differ from --pairs (the reference pass writes a new pairs set)")
    with timeline.phase("read_pairs"):  # schema + non-empty checks, fail fast; these rows go to the scorers
        table = read_pairs(pairs_uri, canonical=False)
    with timeline.phase("check_images"):
        check_images_exist(table)

    with timeline.phase("ensure_models"):
        cfg = cfg.model_copy(update={"models": ensure_models(cfg.models, ["mllm"], cfg.name, "reference")})
    with timeline.phase("ray_init"):
        init_ray(cfg.ray)
    ref = cfg.reference
    with timeline.phase("plan"):
        # from_blocks keeps the blocks as given and reads their metadata here, where from_arrow
        # would start a remote task per block (and wait for a worker to import Ray Data) to read it
        ds = ray.data.from_blocks(scorer_blocks(table, ref.batch_size * 4))
    ds = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"models": cfg.models.model_dump(mode="json"), "max_length": cfg.train.max_length,
                               "average_logp": cfg.train.average_logp, "micro_batch": ref.batch_size,
                               "cpu_isa": cfg.numerics.cpu_isa},
        batch_size=ref.batch_size * 4,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ref.num_actors),
        num_cpus=ref.num_cpus,
        num_gpus=ref.num_gpus,
        runtime_env=worker_runtime_env(cfg.numerics),
    )
    with timeline.phase("ray_data"):  # executor start, scorer actors (start, model load), batches
        scored = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    with timeline.phase("write"):
        written = write_scored(scored, table, out_pairs)
    unscored = written.column("ref_chosen_logp").null_count
    with timeline.phase("reference_settings"):  # hashes the model's weights
        settings = reference_settings(cfg)
    manifest = Manifest(
        stage="reference",
        counts=ManifestCounts(items_in=table.num_rows, paired=written.num_rows - unscored, filtered=unscored,
                              pairs_written=written.num_rows,
                              by_reason={"prompt_too_long": unscored} if unscored else {}),
        config={"reference_settings": settings, "pairs": pairs_uri,
                "reference": cfg.reference.model_dump(mode="json")},
        versions=library_versions(),
        timings={"wall_s": round(time.perf_counter() - started, 3), **phase_seconds(timeline)},
    )
    storage.write_text(storage.join(out_uri, "manifest.json"), manifest.model_dump_json(indent=2))
    return manifest
