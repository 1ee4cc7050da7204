"""The reference pass: a Ray Data job that adds ``ref_chosen_logp``/``ref_rejected_logp`` to every
pair, computed by the base model exactly as training computes the policy's log-probs (same
prompt format, answer-token mask, truncation, sum or average). Training on its output skips the
reference forward pass entirely (Li et al. 2024 precomputes them the same way); TRL refuses this for
vision datasets.

Pairs whose prompt leaves no room for an answer within ``train.max_length`` keep null reference
log-probs and are counted in the manifest (training drops them too).
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from bpo_ray import storage
from bpo_ray.config import BPOConfig
from bpo_ray.schemas import Manifest, ManifestCounts, PAIR_SCHEMA, check_pairs, library_versions, read_parquet
from bpo_ray.train.data import PairsError, check_images_exist, pairs_location, read_pairs


class ReferenceScorer:
    """Ray Data actor: the base MLLM scoring batches of pairs (Arrow tables in, Arrow tables out)."""

    def __init__(self, models: dict[str, Any], max_length: int, average_logp: bool, micro_batch: int,
                 cpu_isa: str = "native"):
        import torch

        from bpo_ray import numerics
        from bpo_ray.config.shared import ModelsConfig
        from bpo_ray.models.loading import load_mllm

        numerics.check(cpu_isa, where="reference scorer")

        cfg = ModelsConfig.model_validate(models)
        self.model, self.processor = load_mllm(cfg.mllm, dtype=cfg.dtype, device=cfg.device, cache_dir=cfg.cache_dir)
        self.device = next(self.model.parameters()).device
        self.dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
        self.max_length, self.average_logp, self.micro_batch = max_length, average_logp, micro_batch
        self._images: dict[str, Any] = {}

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


def reference_settings(cfg: BPOConfig) -> dict[str, Any]:
    """What the reference log-probs depend on; training checks its own settings against these
    (``trainer.check_reference_settings``). ``model_sha256`` is the weights' identity for a local
    checkpoint (None for a remote one: the URI identifies it)."""
    from bpo_ray.models.checkpoint import local_weights_sha256

    return {"model": cfg.models.mllm, "model_sha256": local_weights_sha256(cfg.models.mllm), "dtype": cfg.models.dtype,
            "max_length": cfg.train.max_length, "average_logp": cfg.train.average_logp}


def run_reference(cfg: BPOConfig, pairs_uri: str, out_uri: str) -> Manifest:
    """Score every pair at ``pairs_uri`` with the base model; write ``out_uri/pairs`` + manifest."""
    import ray

    from bpo_ray.models.ensure import ensure_models
    from bpo_ray.raycluster import init_ray, worker_runtime_env

    started = time.perf_counter()
    source = pairs_location(pairs_uri)
    out_pairs = storage.join(out_uri, "pairs")
    if storage.filesystem(source)[1].rstrip("/") == storage.filesystem(out_pairs)[1].rstrip("/"):
        raise PairsError("--out must differ from --pairs (the reference pass writes a new pairs set)")
    table = read_pairs(pairs_uri)  # schema + non-empty checks, fail fast
    check_images_exist(table)
    files = storage.list_files(source, ".parquet")

    cfg = cfg.model_copy(update={"models": ensure_models(cfg.models, ["mllm"], cfg.name, "reference")})
    init_ray(cfg.ray)
    ref = cfg.reference
    fs, _ = storage.filesystem(source)
    ds = ray.data.read_parquet([storage.filesystem(f)[1] for f in files], filesystem=fs, schema=PAIR_SCHEMA,
                               partitioning=None)
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
    out_fs, out_path = storage.filesystem(out_pairs)
    from ray.data import SaveMode

    ds.write_parquet(out_path, filesystem=out_fs, mode=SaveMode.OVERWRITE)

    written = read_parquet(out_pairs, PAIR_SCHEMA, what=f"reference output {out_pairs}")
    unscored = written.column("ref_chosen_logp").null_count
    manifest = Manifest(
        stage="reference",
        counts=ManifestCounts(items_in=table.num_rows, paired=written.num_rows - unscored, filtered=unscored,
                              pairs_written=written.num_rows,
                              by_reason={"prompt_too_long": unscored} if unscored else {}),
        config={"reference_settings": reference_settings(cfg), "pairs": pairs_uri,
                "reference": cfg.reference.model_dump(mode="json")},
        versions=library_versions(),
        timings={"wall_s": round(time.perf_counter() - started, 3)},
    )
    if written.num_rows != table.num_rows:
        raise PairsError(f"reference pass wrote {written.num_rows} pairs for {table.num_rows} read")
    storage.write_text(storage.join(out_uri, "manifest.json"), manifest.model_dump_json(indent=2))
    return manifest
