"""Preference pairs for training: read, validate (fail fast), order, and encode batches.

The driver validates once before any worker starts: the pairs must match ``PAIR_SCHEMA``, be
non-empty, and every image they name must exist. Pairs whose prompt alone exceeds
``max_length`` are dropped and listed (never silently). With ``train.validation`` on, some kept
pairs are held out of training by a hash of their id (``held_out_rows``).

The driver's read is the only full read: it writes the kept rows, in canonical order, as the
run's training copy (``write_training_data``). Each worker reads from that copy only its share
of the epoch, the rows it takes of a seeded per-epoch order (``epoch_share``, ``PairShare``),
so a run resumed from a checkpoint, on any number of workers, continues at the exact position it
stopped, and a worker's memory holds ``1/workers`` of the pairs, not all of them.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bpo_ray import storage
from bpo_ray.config.train import ValidationConfig
from bpo_ray.images import ImageError, load_image
from bpo_ray.models.prompts import IMAGE_TOKEN
from bpo_ray.schemas import PAIR_SCHEMA, SchemaError, read_parquet
from bpo_ray.models.prompts import pair_prompt
from bpo_ray.train.logprobs import EncodedPair, PromptTooLong, encode_pair
from bpo_ray.train.timeline import Timeline


class PairsError(ValueError):
    """The pairs cannot be trained on; the message says which and why."""


def pairs_location(uri: str) -> str:
    """``uri`` itself, or ``uri/pairs`` when ``uri`` is a stage output directory."""
    nested = storage.join(uri, "pairs")
    return nested if storage.exists(nested) else uri


def read_pairs(uri: str, canonical: bool = True) -> pa.Table:
    """All pairs under ``uri`` (a Parquet file, a directory of them, or a stage output dir), in
    ``canonical_order`` (or, with ``canonical=False``, as the files hold them)."""
    location = pairs_location(uri)
    if not storage.exists(location):
        raise PairsError(f"no pairs at {uri}: path does not exist")
    if not storage.list_files(location, ".parquet"):
        raise PairsError(f"no pairs at {uri}: no .parquet files")
    try:
        table = read_parquet(location, PAIR_SCHEMA, what=f"pairs at {uri}")
    except SchemaError as exc:
        raise PairsError(f"pairs do not match the pair schema: {exc}") from exc
    if table.num_rows == 0:
        raise PairsError(f"no pairs at {uri}: the Parquet files hold 0 rows")
    return canonical_order(table) if canonical else table


#: What orders pairs for training: their content, never file names, row order or ids (ids and
#: image URIs name where the run lives; the reference pass writes rows in Ray Data's order).
CANONICAL_KEYS = ("source_id", "strategy", "noise_step", "prompt", "chosen", "rejected", "seed")


def canonical_order(table: pa.Table) -> pa.Table:
    """``table``'s rows sorted by content, so the seeded epoch order (and so the trained weights)
    is the same wherever the pairs were written and however they were split into files."""
    import pyarrow.compute as pc

    keys = [(k, "ascending") for k in CANONICAL_KEYS if k in table.column_names]
    return table.take(pc.sort_indices(table, sort_keys=keys, null_placement="at_start"))


def check_images_exist(table: pa.Table, max_listed: int = 5, threads: int = 16) -> None:
    """Raise ``PairsError`` naming the pairs whose image file is missing."""
    uris = sorted(set(table.column("image").to_pylist()))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        present = dict(zip(uris, pool.map(storage.exists, uris)))
    missing = [u for u in uris if not present[u]]
    if missing:
        ids = [i for i, u in zip(table.column("id").to_pylist(), table.column("image").to_pylist()) if not present[u]]
        raise PairsError(
            f"{len(ids)} pairs name {len(missing)} images that do not exist, e.g. "
            f"{', '.join(missing[:max_listed])} (pairs {', '.join(ids[:max_listed])})"
        )


def has_reference(table: pa.Table) -> bool:
    """True when every pair carries both precomputed reference log-probs."""
    return all(table.column(c).null_count == 0 for c in ("ref_chosen_logp", "ref_rejected_logp"))


def prompt_token_counts(processor, table: pa.Table) -> list[int]:
    """Prompt length of each pair in tokens, image tokens included (one image is decoded, to
    learn how many tokens the processor expands ``<image>`` to)."""
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    first_image, _ = load_image(table.column("image")[0].as_py())
    expanded = processor(images=[first_image], text=[IMAGE_TOKEN])["input_ids"][0]
    n_image = sum(1 for t in expanded if t == image_token_id)
    texts = [pair_prompt(p) for p in table.column("prompt").to_pylist()]
    return [len(ids) + (n_image - 1) * ids.count(image_token_id) for ids in processor.tokenizer(texts)["input_ids"]]


@dataclass
class PreparedPairs:
    """What the driver hands the workers: the pairs' location and which rows to train on."""

    uri: str
    num_pairs: int
    keep: list[int]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> pair ids
    reference: bool = False
    held_out: list[int] = field(default_factory=list)  # validation rows, never trained on
    held_out_ids: list[str] = field(default_factory=list)


def held_out_rows(ids: Sequence[str], rows: Sequence[int], n: int, seed: int) -> list[int]:
    """The ``n`` of ``rows`` whose pair ids hash lowest (salted with ``seed``), in row order.

    A pair's place depends on its id alone, so the same pairs are held out on every run, resume
    and worker count, whatever order the Parquet files list them in.
    """
    def rank(i: int) -> tuple[bytes, int]:
        return hashlib.sha256(f"bpo-ray-validation:{seed}:{ids[i]}".encode()).digest(), i

    return sorted(sorted(rows, key=rank)[:n])


def prepare_pairs(
    uri: str, processor, max_length: int, check_images: bool = True, strategies: Optional[Sequence[str]] = None,
    noise_steps: Optional[Sequence[int]] = None, validation: Optional[ValidationConfig] = None,
    timeline: Optional[Timeline] = None,
) -> PreparedPairs:
    """Read the pairs at ``uri`` (``read_pairs``) and ``select_pairs`` them for training."""
    timeline = timeline or Timeline()
    with timeline.phase("driver.read_pairs"):
        table = read_pairs(uri)
    return select_pairs(table, uri, processor, max_length, check_images, strategies, noise_steps, validation, timeline)


def select_pairs(
    table: pa.Table, uri: str, processor, max_length: int, check_images: bool = True,
    strategies: Optional[Sequence[str]] = None, noise_steps: Optional[Sequence[int]] = None,
    validation: Optional[ValidationConfig] = None, timeline: Optional[Timeline] = None,
) -> PreparedPairs:
    """Validate ``table`` (the pairs at ``uri``, in ``canonical_order``) for training; see the
    module docstring for the checks.

    ``strategies`` keeps only pairs whose negative came from those strategies (the paper's
    single-strategy ablations, Table 5); the others are listed as ``strategy_not_selected``.
    ``noise_steps`` keeps only the image-weakened pairs of those diffusion steps (the others are
    listed as ``noise_step_not_selected``); pairs of other strategies are not affected.
    ``validation`` (when enabled) moves some kept pairs to ``held_out`` (see ``held_out_rows``).
    ``timeline`` (optional) gets the image check and token count phases.
    """
    timeline = timeline or Timeline()
    ids = table.column("id").to_pylist()
    dropped: dict[str, list[str]] = {}
    rows = list(range(table.num_rows))
    if strategies is not None:
        wanted = set(strategies)
        of_row = table.column("strategy").to_pylist()
        rows = [i for i in rows if of_row[i] in wanted]
        if len(rows) < table.num_rows:
            dropped["strategy_not_selected"] = [ids[i] for i in range(table.num_rows) if of_row[i] not in wanted]
        if not rows:
            raise PairsError(f"none of the {table.num_rows} pairs at {uri} comes from train.strategies="
                             f"{sorted(wanted)} (they hold {sorted(set(of_row))})")
    if noise_steps is not None:
        steps, wanted_steps = table.column("noise_step").to_pylist(), set(noise_steps)
        of_row = table.column("strategy").to_pylist()
        other = [i for i in rows if of_row[i] == "image_weakened" and steps[i] not in wanted_steps]
        if other:
            dropped["noise_step_not_selected"] = [ids[i] for i in other]
            rows = sorted(set(rows) - set(other))
        if not rows:
            raise PairsError(f"no pairs at {uri} are left after train.noise_steps={sorted(wanted_steps)}")
    selected = table.take(rows)
    if check_images:
        with timeline.phase("driver.check_images"):
            check_images_exist(selected)
    with timeline.phase("driver.prompt_tokens"):
        lengths = dict(zip(rows, prompt_token_counts(processor, selected)))
    keep = [i for i in rows if lengths[i] < max_length]
    too_long = [ids[i] for i in rows if lengths[i] >= max_length]
    if too_long:
        dropped["prompt_too_long"] = too_long
    if not keep:
        raise PairsError(f"all {len(rows)} prompts are longer than train.max_length={max_length} "
                         f"(image tokens included; shortest has {min(lengths.values())} tokens)")
    held_out: list[int] = []
    if validation is not None and validation.enabled:
        n = validation.n_pairs or max(1, round(validation.fraction * len(keep)))
        if n >= len(keep):
            raise PairsError(f"train.validation holds out {n} of the {len(keep)} usable pairs, leaving none to "
                             "train on; lower train.validation.fraction / n_pairs")
        held_out = held_out_rows(ids, keep, n, validation.seed)
        held = set(held_out)
        keep = [i for i in keep if i not in held]
    return PreparedPairs(
        uri=uri,
        num_pairs=table.num_rows,
        keep=keep,
        dropped=dropped,
        reference=has_reference(table.take(keep + held_out)),
        held_out=held_out,
        held_out_ids=[ids[i] for i in held_out],
    )


@functools.lru_cache(maxsize=4)
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of rows in ``epoch`` (same on every worker, every restart)."""
    digest = hashlib.sha256(f"bpo-ray-train:{seed}:{epoch}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(num_rows)


#: The columns a worker reads; the training copy holds these alone.
TRAIN_COLUMNS = ("id", "image", "image_sha256", "prompt", "chosen", "rejected", "ref_chosen_logp", "ref_rejected_logp")
#: Rows per Parquet row group of the training copy: the unit a worker reads.
TRAIN_ROW_GROUP = 256
TRAIN_DATA_DIR = "train_data"


@dataclass
class TrainData:
    """What the driver hands the workers: where the training copy lies and how many rows it has
    (a few numbers, whatever the number of pairs)."""

    train_uri: str
    train_rows: int
    held_out_uri: Optional[str] = None
    held_out_rows: int = 0


def write_training_data(table: pa.Table, prepared: PreparedPairs, out_uri: str) -> TrainData:
    """Write the kept pairs (``OUT/train_data/train.parquet``) and the held-out ones
    (``held_out.parquet``), in the order ``prepared`` lists them (canonical order), with only
    ``TRAIN_COLUMNS``, in row groups of ``TRAIN_ROW_GROUP`` rows.

    The driver has read and checked every pair; workers read this copy instead of the pairs, so
    none of them reads, sorts or filters the whole pairs table again, and each keeps only the rows
    of its share (``PairShare``). Row ``j`` of ``train.parquet`` is ``prepared.keep[j]``: the
    seeded order (``epoch_order``) indexes it exactly as it indexed the kept rows before.
    """
    base = storage.join(out_uri, TRAIN_DATA_DIR)

    def write(rows: list[int], name: str) -> str:
        uri = storage.join(base, name)
        fs, path = storage.filesystem(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table.take(rows).select(list(TRAIN_COLUMNS)), path, filesystem=fs,
                       row_group_size=TRAIN_ROW_GROUP)
        return uri

    held = write(prepared.held_out, "held_out.parquet") if prepared.held_out else None
    return TrainData(write(prepared.keep, "train.parquet"), len(prepared.keep), held, len(prepared.held_out))


def row_group_starts(meta: pq.FileMetaData) -> np.ndarray:
    """The first row of each row group of a Parquet file, and the file's row count last
    (``num_row_groups + 1`` offsets): row group ``g`` holds rows ``starts[g]..starts[g + 1] - 1``."""
    return np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])


def parquet_rows(uri: str) -> int:
    """Rows in one Parquet file, from its footer."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


class PairShare:
    """One worker's share of a training copy (``write_training_data``): ``load`` reads the rows it
    names, row group by row group, and keeps those alone; ``encode`` turns a loaded row into model
    inputs. Rows keep their index in the file, so the seeded order addresses them unchanged.

    Images are read once and cached (pairs share them)."""

    READ_GROUPS = 16  # row groups per read call
    def __init__(self, uri: str, num_rows: int, processor, max_length: int, image_cache: int = 1024):
        self.uri, self.num_rows = uri, num_rows
        self.processor = processor
        self.max_length = max_length
        self._slot: dict[int, int] = {}
        self._cols: dict[str, list] = {c: [] for c in TRAIN_COLUMNS}
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()
        self._cache_size = image_cache
        self.row_groups_read = 0

    def __len__(self) -> int:
        return self.num_rows

    @property
    def loaded(self) -> list[int]:
        """The rows held now, in file order."""
        return sorted(self._slot)

    def load(self, rows: Sequence[int]) -> None:
        """Hold exactly ``rows`` (dropping the rows held before): only the row groups that
        contain one of them are read."""
        wanted = np.unique(np.asarray(rows, dtype=np.int64))
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= self.num_rows):
            raise PairsError(f"{self.uri}: rows {wanted[0]}..{wanted[-1]} asked of {self.num_rows}")
        fs, path = storage.filesystem(self.uri)
        slot: dict[int, int] = {}
        cols: dict[str, list] = {c: [] for c in TRAIN_COLUMNS}
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            if reader.metadata.num_rows != self.num_rows:
                raise PairsError(f"{self.uri} holds {reader.metadata.num_rows} rows, the run was planned "
                                 f"with {self.num_rows}: it changed while training")
            starts = row_group_starts(reader.metadata)
            of_row = np.searchsorted(starts, wanted, side="right") - 1  # each wanted row's group
            groups = np.unique(of_row).tolist()
            for at in range(0, len(groups), self.READ_GROUPS):  # a few row groups per read call
                chunk = groups[at:at + self.READ_GROUPS]
                part = reader.read_row_groups(chunk, columns=list(TRAIN_COLUMNS))
                sizes = np.diff(starts)[chunk]
                # a row's place in ``part``: its place in its group plus the rows of the groups before
                shift = dict(zip(chunk, np.cumsum(np.concatenate([[0], sizes[:-1]])) - starts[chunk]))
                in_chunk = np.isin(of_row, chunk)
                mine = wanted[in_chunk]
                part = part.take(pa.array([r + shift[g] for r, g in zip(mine, of_row[in_chunk])]))
                for c in TRAIN_COLUMNS:
                    cols[c].extend(part.column(c).to_pylist())
                for r in mine:
                    slot[int(r)] = len(slot)
                self.row_groups_read += len(chunk)
        self._slot, self._cols = slot, cols

    def _get(self, column: str, i: int):
        try:
            return self._cols[column][self._slot[i]]
        except KeyError:  # a row outside the loaded share: the loop's bookkeeping is wrong
            raise PairsError(f"row {i} of {self.uri} is not in this worker's loaded share") from None

    def image(self, i: int) -> Image.Image:
        uri, pair_id = self._get("image", i), self._get("id", i)
        if uri not in self._cache:
            try:
                img, sha = load_image(uri)
            except ImageError as exc:
                raise PairsError(f"pair {pair_id}: image {uri}: {exc}") from exc
            expected = self._get("image_sha256", i)
            if expected and sha != expected:
                raise PairsError(f"pair {pair_id}: image {uri} changed since the pair was made "
                                 f"(sha256 {sha[:12]} != {expected[:12]})")
            self._cache[uri] = img
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(uri)
        return self._cache[uri]

    def encode(self, i: int) -> EncodedPair:
        try:
            return encode_pair(self.processor, self.image(i), self._get("prompt", i), self._get("chosen", i),
                               self._get("rejected", i), self.max_length)
        except PromptTooLong as exc:  # prepare_pairs dropped these; reaching here is a bug
            raise PairsError(f"pair {self._get('id', i)}: {exc}") from exc

    def reference_logps(self, rows: Sequence[int]) -> Optional[tuple[list[float], list[float]]]:
        chosen = [self._get("ref_chosen_logp", i) for i in rows]
        rejected = [self._get("ref_rejected_logp", i) for i in rows]
        if any(v is None for v in chosen + rejected):
            return None
        return chosen, rejected


@dataclass
class DataPosition:
    """Where training stands in the data: ``epoch`` and the ``offset`` into its order."""

    epoch: int = 0
    offset: int = 0
    samples_seen: int = 0

    def take(self, num_rows: int, global_batch: int, seed: int) -> np.ndarray:
        """The next ``global_batch`` rows (advancing to a new epoch when too few remain)."""
        if global_batch > num_rows:
            raise PairsError(f"{num_rows} pairs cannot fill one global batch of {global_batch} "
                             "(per_device_batch_size x workers); use fewer workers or a smaller batch")
        if self.offset + global_batch > num_rows:
            self.epoch, self.offset = self.epoch + 1, 0
        rows = epoch_order(num_rows, seed, self.epoch)[self.offset:self.offset + global_batch]
        self.offset += global_batch
        self.samples_seen += global_batch
        return rows


def epoch_share(position: DataPosition, num_rows: int, global_batch: int, seed: int, rank: int,
                micro: int) -> tuple[int, np.ndarray]:
    """The epoch the next ``position.take`` falls in, and the rows ``rank`` takes from there to
    that epoch's end (its ``micro`` rows of each global batch): what a worker loads."""
    epoch, offset = position.epoch, position.offset
    if offset + global_batch > num_rows:
        epoch, offset = epoch + 1, 0
    order = epoch_order(num_rows, seed, epoch)
    parts = [order[s + rank * micro:s + (rank + 1) * micro]
             for s in range(offset, num_rows - global_batch + 1, global_batch)]
    return epoch, (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def total_samples(num_rows: int, epochs: float) -> int:
    """Samples a run of ``epochs`` epochs consumes (fractional epochs allowed)."""
    return int(math.floor(num_rows * epochs))
