"""Streaming ingestion: LLaVA-format sources -> item blocks with Ray Data, the driver holding no records.

``sources.read_source`` reads every record on the driver. This module gives the same items (ids,
order, shards, generation groups, the same ``sample_items`` draw) while the records stay in Ray
tasks, so a ShareGPT4V-size source (about a million records) costs the driver only a few numbers
per chunk:

1. **Plan chunks** (driver): a ``.jsonl`` file is cut into byte ranges of ``chunk_bytes``; a chunk
   owns the lines that start inside it (the Hadoop ``TextInputFormat`` rule), so each line is read
   by exactly one chunk. A ``.json`` array cannot be split without parsing it, so it is one chunk
   (parsed in a task, not on the driver).
2. **Scan** (Ray Data tasks, one per chunk): parse and screen every record, count the items each
   one explodes into, hash the chunk's bytes, and send each record id with its position to one of
   ``id_partitions`` ``IdRegistry`` actors (partitioned by CRC-32 of the id).
3. **Resolve duplicates** (registry actors): the first position of an id wins, as in
   ``read_source``; each registry reports per chunk how many items its duplicates remove. The
   driver now knows every chunk's exact item count: the total, the seeded ``sample_items`` draw
   (the same ``random.Random(seed).sample(range(n), k)`` as ``read_source``), and which orders
   each chunk's items get.
4. **Emit** (the dataset the generate stage consumes): one Ray Data task per chunk explodes its
   records into item rows and emits whole shards, as Arrow blocks with the ``group`` column of
   ``pipeline.group_blocks``. A shard that starts in a chunk is emitted by that chunk's task,
   reading on into the next chunk(s) if it has to, so generation groups and shards never straddle
   two tasks, whatever Ray Data schedules. Shards already committed are skipped. A streaming
   repartition then cuts the tasks' output into one block per generation group.

The plan check on resume fingerprints the input incrementally: the SHA-256 of every chunk's bytes
(computed in the scan) and the exact item count, instead of a hash of every item id on the driver.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa

from bpo_ray import storage
from bpo_ray.generate.sources import (
    ITEM_COLUMNS, SourceError, count_items, duplicate_item, explode_record, file_stem_and_root,
    iter_json_records, iter_jsonl_records, list_source_files, screen_record,
)

CHUNK_BYTES = 8 * 1024 * 1024
ID_PARTITIONS = 2
OBJECT_STORE_MB = 128.0  # Ray Data's object-store budget for the generate dataset (see SourceIndex.dataset)
_BOUNDARY_STEP = 64 * 1024
_POS_SHIFT = 32  # position of a record: chunk index << 32 | record index within the chunk


@dataclass(frozen=True)
class Chunk:
    """A byte range of one source file; ``kind`` is ``jsonl`` (lines) or ``json`` (whole file)."""

    index: int
    uri: str
    kind: str
    start: int
    end: int
    stem: str
    root: str

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


def plan_chunks(files: list[str], images_root: Optional[str], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """The chunks of ``files`` in source order (file order, then byte order)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    chunks: list[Chunk] = []
    for uri in files:
        stem, root = file_stem_and_root(uri, images_root)
        try:
            size = storage.file_size(uri)
        except storage.StorageError as exc:
            raise SourceError(f"cannot read source file {uri}: {exc}") from exc
        if uri.endswith(".jsonl"):
            ranges = [(a, min(a + chunk_bytes, size)) for a in range(0, size, chunk_bytes)] or [(0, 0)]
        else:  # as read_source: anything that is not .jsonl is parsed as one JSON document
            ranges = [(0, size)]
        for start, end in ranges:
            kind = "jsonl" if uri.endswith(".jsonl") else "json"
            chunks.append(Chunk(len(chunks), uri, kind, start, end, stem, root))
    return chunks


def _line_start(uri: str, pos: int, size: int) -> int:
    """The first offset >= ``pos`` that starts a line (0, or just after a ``\\n``), else ``size``."""
    if pos <= 0:
        return 0
    off = pos - 1
    while off < size:
        buf = storage.read_range(uri, off, _BOUNDARY_STEP)
        if not buf:
            break
        i = buf.find(b"\n")
        if i >= 0:
            return off + i + 1
        off += len(buf)
    return size


def read_chunk(chunk: Chunk) -> bytes:
    """The bytes a chunk owns: for JSON Lines, the whole lines that start in ``[start, end)``.

    Cutting only after ``\\n`` keeps ``bytes.splitlines`` of the pieces equal to that of the whole
    file (a ``\\r\\n`` is never split), so line numbers match ``read_source``'s.
    """
    if chunk.kind == "json":
        return storage.read_bytes(chunk.uri)
    size = storage.file_size(chunk.uri)
    lo = _line_start(chunk.uri, chunk.start, size)
    hi = _line_start(chunk.uri, chunk.end, size) if chunk.end < size else size
    return storage.read_range(chunk.uri, lo, hi - lo) if hi > lo else b""


def chunk_records(chunk: Chunk, data: bytes, first_line: int = 1) -> Iterator[tuple[str, Any, Optional[str]]]:
    """``(locator, record, error)`` of the records in a chunk's bytes, as ``read_source`` sees them."""
    if chunk.kind == "jsonl":
        return iter_jsonl_records(data, chunk.name, first_line)
    return iter_json_records(data, chunk.name)


def id_partition(record_id: str, n: int) -> int:
    """The registry that owns ``record_id`` (stable across processes, unlike ``hash``)."""
    return zlib.crc32(record_id.encode("utf-8")) % n


class IdRegistry:
    """One partition of the record ids of a source: which position of each id comes first.

    Scan tasks register ``(id, position, n_items)`` in any order; after ``resolve`` every position
    but the smallest of an id is a duplicate (one ``duplicate_id`` item instead of ``n_items``).
    Memory grows with this partition's ids; more partitions spread it over the cluster.
    """

    def __init__(self) -> None:
        self._first: dict[str, tuple[int, int]] = {}
        self._more: dict[str, list[tuple[int, int]]] = {}
        self._dups: dict[int, list[int]] = {}

    def register(self, entries: list[tuple[str, int, int]]) -> int:
        for rid, pos, n in entries:
            if rid in self._first:
                self._more.setdefault(rid, []).append((pos, n))
            else:
                self._first[rid] = (pos, n)
        return len(entries)

    def resolve(self) -> dict[int, int]:
        """Per chunk, the change in its item count from its duplicates (``1 - n_items`` each)."""
        delta: dict[int, int] = {}
        dups: dict[int, set[int]] = {}
        for rid, more in self._more.items():
            for pos, n in sorted([self._first[rid], *more])[1:]:
                chunk, rec = pos >> _POS_SHIFT, pos & ((1 << _POS_SHIFT) - 1)
                delta[chunk] = delta.get(chunk, 0) + 1 - n
                dups.setdefault(chunk, set()).add(rec)
        self._dups = {c: sorted(r) for c, r in dups.items()}
        return delta

    def duplicates(self, chunk: int) -> list[int]:
        """Record indices of ``chunk`` that repeat an earlier record's id."""
        return self._dups.get(chunk, [])

    def stats(self) -> dict[str, int]:
        return {"ids": len(self._first), "duplicated_ids": len(self._more)}


def scan_chunks(batch: dict[str, Any], registries: list) -> dict[str, Any]:
    """Ray Data task: per chunk, screen and count its records and register their ids."""
    import ray

    out: dict[str, list] = {k: [] for k in ("index", "sha256", "n_lines", "n_records", "n_items", "error")}
    for text in batch["chunk"]:
        chunk = Chunk(**json.loads(str(text)))
        try:
            data = read_chunk(chunk)
        except storage.StorageError as exc:  # reported, not raised: Ray Data would keep only its type
            data, out["error"] = b"", out["error"] + [f"cannot read source file {chunk.uri}: {exc}"]
        else:
            out["error"].append("")
        parts: list[list[tuple[str, int, int]]] = [[] for _ in registries]
        n_records = n_items = 0
        for rec, (locator, record, error) in enumerate(chunk_records(chunk, data)):
            n_records += 1
            _, rid, bad = screen_record(chunk.stem, locator, record, error)
            if bad is not None:
                n_items += 1
                continue
            n = count_items(record)
            n_items += n
            parts[id_partition(rid, len(registries))].append((rid, (chunk.index << _POS_SHIFT) | rec, n))
        ray.get([reg.register.remote(p) for reg, p in zip(registries, parts) if p])
        out["index"].append(chunk.index)
        out["sha256"].append(hashlib.sha256(data).hexdigest())
        out["n_lines"].append(len(data.splitlines()) if chunk.kind == "jsonl" else 0)
        out["n_records"].append(n_records)
        out["n_items"].append(n_items)
    return out


def emit_items(batch: dict[str, Any], registries: list, shard_size: int, group_size: int,
               max_text_chars: int) -> Iterator[pa.Table]:
    """Ray Data task: the item rows of the orders ``[start, end)`` of one emit task, a table a shard.

    Walks the task's chunks from the first, numbering every item as ``read_source`` would
    (``p0`` = the chunk's first item index in the whole source, ``keep`` = the sampled indices),
    and keeps those whose order falls in the task's range and whose shard is not done.
    """
    import ray

    per_shard = -(-shard_size // group_size)
    for text in batch["task"]:
        task = json.loads(str(text))
        start, end, keep, done = task["start"], task["end"], task["keep"], set(task["done"])
        ki = 0  # next sampled index (keep is the task's slice of the sorted sample)
        rows: list[dict[str, Any]] = []
        shard = -1
        finished = False
        for spec in task["chunks"]:
            chunk = Chunk(**spec["chunk"])
            dups = set().union(*ray.get([r.duplicates.remote(chunk.index) for r in registries]))
            idx = spec["p0"]
            for rec, (locator, record, error) in enumerate(chunk_records(chunk, read_chunk(chunk), spec["first_line"])):
                src, rid, bad = screen_record(chunk.stem, locator, record, error)
                if bad is not None:
                    items = [bad]
                elif rec in dups:
                    items = [duplicate_item(src, rid, locator, record)]
                else:
                    items = explode_record(record, src, chunk.root, max_text_chars, rid)
                for item in items:
                    if keep is None:
                        order = idx
                    elif ki < len(keep) and keep[ki] == idx:
                        order = task["rank0"] + ki
                        ki += 1
                    else:
                        idx += 1
                        continue
                    idx += 1
                    if order < start:
                        continue
                    if order >= end:
                        finished = True
                        break
                    item_shard = order // shard_size
                    if item_shard != shard and rows:
                        yield pa.Table.from_pylist(rows)
                        rows = []
                    shard = item_shard
                    if item_shard in done:
                        continue
                    item.update(order=order, shard=item_shard)
                    rows.append({**item, "group": item_shard * per_shard + (order % shard_size) // group_size})
                if finished:
                    break
            if finished:
                break
        if rows:
            yield pa.Table.from_pylist(rows)


@dataclass
class SourceIndex:
    """What the driver keeps of a scanned source: a few numbers per chunk, never a record."""

    source: str
    files: list[str]
    chunks: list[Chunk]
    chunk_items: list[int]            # items of each chunk before sampling (duplicates resolved)
    chunk_lines: list[int]
    chunk_sha256: list[str]
    n_source_items: int
    keep: Optional[list[int]]         # sorted sampled item indices (sample_items), or None
    n_items: int                      # items of the run (after sample_items and max_items)
    chunk_bytes: int
    max_text_chars: int
    registries: list = field(default_factory=list, repr=False)

    def plan_fields(self) -> dict[str, Any]:
        """The input part of the generate plan: chunk digests and exact counts."""
        digest = hashlib.sha256("\n".join(f"{c.uri}:{c.start}:{c.end}:{h}" for c, h in
                                          zip(self.chunks, self.chunk_sha256)).encode()).hexdigest()
        return {"files": self.files, "n_items": self.n_items, "n_source_items": self.n_source_items,
                "chunk_bytes": self.chunk_bytes, "source_sha256": digest}

    def n_shards(self, shard_size: int) -> int:
        return -(-self.n_items // shard_size)

    def shard_sizes(self, shard_size: int, done: set[int] = frozenset()) -> dict[int, int]:
        """Items per shard not in ``done`` (every shard is full but the last)."""
        return {s: min(shard_size, self.n_items - s * shard_size)
                for s in range(self.n_shards(shard_size)) if s not in done}

    def _rank(self, p: int) -> int:
        return min(bisect.bisect_left(self.keep, p) if self.keep is not None else p, self.n_items)

    def emit_tasks(self, shard_size: int, done: set[int] = frozenset()) -> list[dict[str, Any]]:
        """One emit task per chunk in which a shard starts: its order range and the chunks it reads."""
        def boundary(o: int) -> int:
            return min(-(-o // shard_size) * shard_size, self.n_items)

        p0 = [0]
        for n in self.chunk_items:
            p0.append(p0[-1] + n)
        first_line, line = [], 1
        for i, c in enumerate(self.chunks):
            if i and c.uri != self.chunks[i - 1].uri:
                line = 1
            first_line.append(line)
            line += self.chunk_lines[i]
        ranks = [self._rank(p) for p in p0]
        tasks = []
        for c in range(len(self.chunks)):
            start, end = boundary(ranks[c]), boundary(ranks[c + 1])
            if start >= end:
                continue
            shards = range(start // shard_size, -(-end // shard_size))
            if all(s in done for s in shards):
                continue
            last = c
            while ranks[last + 1] < end:  # the last shard runs on into later chunks
                last += 1
            keep = None
            if self.keep is not None:
                keep = self.keep[bisect.bisect_left(self.keep, p0[c]):bisect.bisect_left(self.keep, p0[last + 1])]
            tasks.append({"start": start, "end": end, "rank0": ranks[c], "keep": keep,
                          "done": [s for s in shards if s in done],
                          "chunks": [{"chunk": asdict(self.chunks[i]), "p0": p0[i], "first_line": first_line[i]}
                                     for i in range(c, last + 1)]})
        return tasks

    def dataset(self, shard_size: int, group_size: int, done: set[int] = frozenset(), num_cpus: float = 0.5,
                runtime_env: Optional[dict] = None, emit_tasks: int = 2,
                object_store_mb: Optional[float] = OBJECT_STORE_MB):
        """The lazy Ray Data dataset of the run's item rows (``ITEM_COLUMNS`` + ``group``) not in ``done``,
        one block per generation group, as ``pipeline.group_blocks`` cuts them.

        An emit task's output is one large block (Ray Data coalesces what a task yields); a streaming
        repartition cuts it back into group-sized blocks, so items flow to the actor pools and shards
        commit group by group. The cut starts at each emit block's start, a shard boundary, so it
        falls on group boundaries (every ``block_rows`` divides both the group and a shard's last,
        partial group).

        At most ``emit_tasks`` emit tasks run at once: a task releases a whole chunk's items, and
        the driver buffers the results of every shard that is not complete yet, so fewer chunks in
        flight keep the driver's memory flat (one task explodes ~40k items/s, far above what the
        model stages consume).

        ``object_store_mb`` caps Ray Data's object-store budget for this dataset and every stage built
        on it (``execution_options.resource_limits.object_store_memory`` of the dataset's own
        ``DataContext`` copy; the global context is untouched). Ray's default budget is half the
        object store: emit and the streaming repartition outrun the stages after them, and the
        backlog of group blocks grows with the source until the run's end (1,958 blocks at 1M
        records). The driver maps every store page it reads a result block from, so its RSS grew
        with that backlog (RssShmem 13 MiB at 100k records, 180 MiB at 1M; docs/scale.md). With a
        budget the backlog, and so the driver's RSS, stays bounded whatever the source size.
        ``None`` keeps Ray's default.
        """
        import ray

        tasks = self.emit_tasks(shard_size, done)
        if not tasks:
            raise ValueError("every shard is done; nothing to emit")
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        extra = {"runtime_env": runtime_env} if runtime_env else {}
        pool = ray.data.TaskPoolStrategy(size=max(1, min(emit_tasks, len(tasks))))
        ds = ds.map_batches(emit_items, batch_size=1, num_cpus=num_cpus, compute=pool, fn_kwargs=dict(
            registries=self.registries, shard_size=shard_size, group_size=group_size,
            max_text_chars=self.max_text_chars), **extra)
        ds = ds.repartition(target_num_rows_per_block=block_rows(shard_size, group_size))
        if object_store_mb is not None:
            limit_object_store(ds, object_store_mb)
        return ds

    def close(self) -> None:
        """Release the id registries (after the dataset has been consumed)."""
        import ray

        for reg in self.registries:
            ray.kill(reg)
        self.registries = []


def limit_object_store(ds, mb: float) -> None:
    """Cap the object-store memory Ray Data may fill with ``ds``'s blocks (and those of datasets built
    on it, which share its ``DataContext``) at ``mb`` MiB, or the tighter limit already set there."""
    options = ds.context.execution_options
    limits = options.resource_limits
    options.resource_limits = limits.copy(object_store_memory=min(limits.object_store_memory, mb * 2**20))


def block_rows(shard_size: int, group_size: int) -> int:
    """Rows per item block: the group size, or a divisor of it that also divides a shard's last group."""
    rest = shard_size % group_size
    return math.gcd(group_size, rest) if rest else group_size


def scan_source(source: str, images_root: Optional[str] = None, max_text_chars: int = 20000,
                max_items: Optional[int] = None, sample_items: Optional[int] = None, seed: int = 0,
                chunk_bytes: int = CHUNK_BYTES, id_partitions: int = ID_PARTITIONS,
                num_cpus: float = 0.5, runtime_env: Optional[dict] = None) -> SourceIndex:
    """Scan ``source`` with Ray Data (steps 1-3 above) on the current Ray cluster.

    Same arguments and same items as ``sources.read_source``; the items themselves come from
    ``SourceIndex.dataset``. Call ``close()`` on the result when done with its dataset.
    """
    import ray

    if id_partitions < 1:
        raise ValueError(f"id_partitions must be >= 1, got {id_partitions}")
    files = list_source_files(source)
    chunks = plan_chunks(files, images_root, chunk_bytes)
    registries = [ray.remote(IdRegistry).options(num_cpus=0, **({"runtime_env": runtime_env} if runtime_env else {}))
                  .remote() for _ in range(id_partitions)]
    try:
        ds = ray.data.from_items([{"chunk": json.dumps(asdict(c))} for c in chunks], override_num_blocks=len(chunks))
        extra = {"runtime_env": runtime_env} if runtime_env else {}
        rows = ds.map_batches(scan_chunks, batch_size=1, num_cpus=num_cpus,
                              fn_kwargs=dict(registries=registries), **extra).take_all()
        errors = [str(r["error"]) for r in rows if r["error"]]
        if errors:
            raise SourceError(errors[0])
        rows.sort(key=lambda r: r["index"])
        if [r["index"] for r in rows] != list(range(len(chunks))):
            raise RuntimeError(f"scan returned {len(rows)} of {len(chunks)} chunks")
        items = [int(r["n_items"]) for r in rows]
        for delta in ray.get([reg.resolve.remote() for reg in registries]):
            for c, d in delta.items():
                items[int(c)] += d
    except BaseException:
        for reg in registries:
            ray.kill(reg)
        raise
    n_source = sum(items)
    keep = None
    if sample_items is not None and sample_items < n_source:
        keep = sorted(random.Random(seed).sample(range(n_source), sample_items))
    n_items = len(keep) if keep is not None else n_source
    if max_items is not None:
        n_items = min(n_items, max_items)
    return SourceIndex(source=source, files=files, chunks=chunks, chunk_items=items,
                       chunk_lines=[int(r["n_lines"]) for r in rows], chunk_sha256=[str(r["sha256"]) for r in rows],
                       n_source_items=n_source, keep=keep, n_items=n_items, chunk_bytes=chunk_bytes,
                       max_text_chars=max_text_chars, registries=registries)


__all__ = ["CHUNK_BYTES", "Chunk", "block_rows", "IdRegistry", "ITEM_COLUMNS", "OBJECT_STORE_MB", "SourceIndex",
           "emit_items", "limit_object_store", "plan_chunks", "read_chunk", "scan_chunks", "scan_source"]
