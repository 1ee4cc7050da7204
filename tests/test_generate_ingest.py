"""Streaming ingestion (bpo_ray/generate/ingest.py) against the driver-side reader it replaces.

The streaming reader must give exactly ``read_source``'s items (ids, order, shards, sampled
selection), so every run keeps its pairs; these tests compare the two on a world-like source
with duplicates across files and every kind of bad record, cut into many small chunks, locally
and on S3, and check resume and the plan fingerprint.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from bpo_ray import storage
from bpo_ray.generate.ingest import IdRegistry, plan_chunks, scan_source
from bpo_ray.generate.sources import ITEM_COLUMNS, SourceError, assign_shards, read_source
from test_generate_units import write_bad_source

SHARD, GROUP = 8, 4


@pytest.fixture(scope="module")
def world_source(tmp_path_factory) -> Path:
    """A directory source: world records over two JSONL files and a JSON array, with duplicates
    within and across files, every bad-record kind, CRLF and blank lines, and a line longer than
    a chunk."""
    from bpo_ray.world.build import build_world

    world = tmp_path_factory.mktemp("ingest_world")
    build_world(str(world), n_scenes=30)
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    src = tmp_path_factory.mktemp("ingest_source")
    bad_path, _, _ = write_bad_source(src / "bad", records[:3], str(world))
    first, second = records[:60], records[60:]
    lines = [json.dumps(r).encode() for r in first]
    lines.insert(10, json.dumps(first[2]).encode())                  # duplicate within a file
    lines.insert(20, b"")                                              # blank line (numbered, no record)
    lines += bad_path.read_bytes().splitlines()                        # every bad kind, incl. a dup of records[0]
    long_rec = dict(first[5], id="long-one", extra="x" * 30000)       # longer than a chunk
    lines.append(json.dumps(long_rec).encode())
    (src / "a.jsonl").write_bytes(b"\r\n".join(lines[:40]) + b"\r\n" + b"\n".join(lines[40:]) + b"\n")
    array = second[:20] + [first[7], {"id": "arr-bad", "image": 3}]     # dup across files, bad row
    text = json.dumps(array)
    (src / "b.json").write_text(text)
    (src / "c.jsonl").write_bytes(b"\n".join(json.dumps(r).encode() for r in second[20:] + [second[0]])
                                  + b'\n{"id": "cut", "image": "x.png", "conv')    # last line truncated
    (src / "cut.json").write_text(text[: text.rindex("{") + 12])      # truncated JSON array
    shutil.rmtree(src / "bad")
    return src


def streamed_items(index, done=frozenset()) -> list[dict]:
    rows = index.dataset(SHARD, GROUP, done).take_all()
    out = []
    for r in rows:
        item = {k: (int(r[k]) if k in ("order", "shard", "turn") else r[k]) for k in ITEM_COLUMNS}
        item["group"] = int(r["group"])
        out.append(item)
    return sorted(out, key=lambda it: it["order"])


def reference_items(source: str, images: str, **kw) -> list[dict]:
    items = read_source(source, images, **kw).items
    assign_shards(items, SHARD)
    per_shard = -(-SHARD // GROUP)
    return [{**it, "group": it["shard"] * per_shard + (it["order"] % SHARD) // GROUP} for it in items]


@pytest.mark.parametrize("kw", [{}, {"sample_items": 70, "seed": 3}, {"max_items": 37},
                                {"sample_items": 90, "seed": 1, "max_items": 50}])
def test_streaming_items_equal_read_source(ray_cluster, world_source, kw):
    images = str(world_source)
    ref = reference_items(str(world_source), images, **kw)
    index = scan_source(str(world_source), images, chunk_bytes=1500, **kw)
    try:
        assert len(index.chunks) > 20  # small chunks: shards and groups straddle chunk boundaries
        got = streamed_items(index)
        assert index.n_items == len(ref) == len(got)
        assert got == ref
        assert index.shard_sizes(SHARD) == dict(Counter(it["shard"] for it in ref))
    finally:
        index.close()
    reasons = Counter(it["reason"] for it in ref if it["status"] != "ok")
    if not kw:  # the source really is hostile
        assert reasons["duplicate_id"] >= 5 and reasons["malformed_json"] == 3
        assert {"non_utf8_text", "not_an_object", "missing_id", "bad_id_type", "unknown_role",
                "missing_image_field", "bad_image_type", "missing_answer"} <= set(reasons)


@pytest.mark.parametrize("shard,group", [(SHARD, GROUP), (10, 4)])
def test_blocks_are_generation_groups(ray_cluster, world_source, shard, group):
    """One block per group, as pipeline.group_blocks cuts them (with 10 % 4 = 2: two-row blocks,
    which still never cut a group)."""
    index = scan_source(str(world_source), str(world_source), chunk_bytes=1500)
    try:
        seen = []
        for block in index.dataset(shard, group).iter_batches(batch_size=None, batch_format="pyarrow"):
            orders = block.column("order").to_pylist()
            assert orders == list(range(orders[0], orders[0] + len(orders)))
            assert len(set(block.column("group").to_pylist())) == 1
            seen.append(len(orders))
            if shard % group == 0:  # full groups, but a shard's last item ends its group
                assert len(orders) == group or orders[-1] == index.n_items - 1
            else:
                assert len(orders) <= 2
        assert sum(seen) == index.n_items
    finally:
        index.close()


def test_resume_emits_exactly_the_shards_not_done(ray_cluster, world_source):
    ref = reference_items(str(world_source), str(world_source))
    index = scan_source(str(world_source), str(world_source), chunk_bytes=1500)
    try:
        done = {0, 2, 5, index.n_shards(SHARD) - 1}
        got = streamed_items(index, done)
        assert got == [it for it in ref if it["shard"] not in done]
        expected = index.shard_sizes(SHARD, done)
        assert sum(expected.values()) == len(got) and not set(expected) & done
    finally:
        index.close()


def test_dataset_bounds_ray_datas_object_store_budget(ray_cluster, world_source):
    """The generate dataset caps Ray Data's object-store budget (the backlog of blocks the driver's
    RSS followed, docs/scale.md) on its own DataContext, shared by the stages built on it; a budget
    below one block still streams every item."""
    import math

    from ray.data import DataContext

    from bpo_ray.generate.ingest import OBJECT_STORE_MB, limit_object_store

    def budget(ds) -> float:
        ctx = ds if isinstance(ds, DataContext) else ds.context
        return ctx.execution_options.resource_limits.object_store_memory

    before = budget(DataContext.get_current())
    index = scan_source(str(world_source), str(world_source), chunk_bytes=1500)
    try:
        ds = index.dataset(SHARD, GROUP)
        assert budget(ds) == OBJECT_STORE_MB * 2**20
        assert budget(ds.map_batches(lambda b: b)) == OBJECT_STORE_MB * 2**20  # later stages share it
        assert budget(DataContext.get_current()) == before  # the global context is untouched
        assert math.isinf(budget(index.dataset(SHARD, GROUP, object_store_mb=None)))
        limit_object_store(ds, 1e6)  # a looser cap keeps the tighter limit already there
        assert budget(ds) == OBJECT_STORE_MB * 2**20
        # a budget below one block (Ray Data then runs one task per operator at a time) still
        # streams exactly the items read_source gives
        tiny = index.dataset(SHARD, GROUP, object_store_mb=0.001)
        assert budget(tiny) == round(0.001 * 2**20)  # Ray keeps whole bytes
        got = sorted(({k: (int(r[k]) if k in ("order", "shard", "turn") else r[k]) for k in ITEM_COLUMNS}
                      for r in tiny.take_all()), key=lambda it: it["order"])
        ref = reference_items(str(world_source), str(world_source))
        assert got == [{k: it[k] for k in ITEM_COLUMNS} for it in ref]
    finally:
        index.close()


def test_plan_fingerprint_follows_the_bytes_not_the_chunking_run(ray_cluster, world_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(world_source, src)
    fields = []
    for _ in range(2):
        index = scan_source(str(src), str(src), chunk_bytes=1500)
        fields.append(index.plan_fields())
        index.close()
    assert fields[0] == fields[1]
    text = (src / "c.jsonl").read_text()
    (src / "c.jsonl").write_text(text.replace('"gpt", "value": "', '"gpt", "value": "X', 1))  # one answer edited
    index = scan_source(str(src), str(src), chunk_bytes=1500)
    changed = index.plan_fields()
    index.close()
    assert changed["n_items"] == fields[0]["n_items"] and changed["source_sha256"] != fields[0]["source_sha256"]


def test_s3_source_gives_the_same_items(ray_cluster, s3_server, world_source):
    uri = f"{s3_server['root']}/ingest-src"
    storage.upload_dir(world_source, uri)
    # images stay local: the items only carry their URIs
    ref = reference_items(uri, str(world_source), sample_items=60, seed=2)
    index = scan_source(uri, str(world_source), chunk_bytes=1500, sample_items=60, seed=2)
    try:
        assert streamed_items(index) == ref
    finally:
        index.close()


def test_empty_and_missing_sources(ray_cluster, tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        scan_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.jsonl").write_bytes(b"")
    (tmp_path / "d" / "blank.jsonl").write_bytes(b"\n\n  \n")
    index = scan_source(str(tmp_path / "d"), chunk_bytes=2)
    try:
        assert index.n_items == 0 and index.shard_sizes(SHARD) == {} and index.emit_tasks(SHARD) == []
    finally:
        index.close()
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_chunks([str(tmp_path / "d" / "blank.jsonl")], None, chunk_bytes=0)


def test_id_registry_keeps_the_first_position_whatever_the_arrival_order():
    reg = IdRegistry()
    chunk = lambda c, r: (c << 32) | r  # noqa: E731
    reg.register([("a", chunk(3, 1), 2), ("b", chunk(0, 0), 1)])
    reg.register([("a", chunk(1, 5), 3), ("a", chunk(2, 0), 4)])  # the first "a" arrives last
    delta = reg.resolve()
    assert delta == {3: 1 - 2, 2: 1 - 4}
    assert reg.duplicates(3) == [1] and reg.duplicates(2) == [0] and reg.duplicates(1) == []
    assert reg.stats() == {"ids": 2, "duplicated_ids": 1}


def test_ingest_config_is_validated_and_kept_out_of_the_plan():
    from bpo_ray.config import load_config
    from bpo_ray.generate.ingest import SourceIndex
    from bpo_ray.generate.pipeline import _plan

    with pytest.raises(Exception, match="chunk_mb"):
        load_config("tiny", ["generate.ingest.chunk_mb=0"])
    with pytest.raises(Exception, match="id_partitions"):
        load_config("tiny", ["generate.ingest.id_partitions=0"])
    with pytest.raises(Exception, match="object_store_mb"):
        load_config("tiny", ["generate.ingest.object_store_mb=0"])
    assert load_config("tiny", ["generate.ingest.object_store_mb=null"]).generate.ingest.object_store_mb is None
    index = SourceIndex(source="s.jsonl", files=["s.jsonl"], chunks=[], chunk_items=[], chunk_lines=[],
                        chunk_sha256=[], n_source_items=0, keep=None, n_items=0, chunk_bytes=1 << 23,
                        max_text_chars=20000)
    plans = [_plan(load_config("tiny", [f"generate.ingest.id_partitions={n}"]), "s.jsonl", None, index)
             for n in (1, 4)]
    assert plans[0] == plans[1] and "ingest" not in plans[0]["generate"]
    assert plans[0]["chunk_bytes"] == 1 << 23 and "source_sha256" in plans[0]


def test_a_file_gone_before_its_scan_is_a_clear_source_error(ray_cluster, tmp_path, monkeypatch):
    import bpo_ray.generate.ingest as ingest

    (tmp_path / "src").mkdir()
    victim = tmp_path / "src" / "a.jsonl"
    victim.write_text('{"id": 1, "image": "x.png", "conversations": []}\n')
    plan = ingest.plan_chunks

    def plan_then_delete(*args, **kwargs):
        chunks = plan(*args, **kwargs)
        victim.unlink()  # listed and sized, gone when its scan task reads it
        return chunks

    monkeypatch.setattr(ingest, "plan_chunks", plan_then_delete)
    with pytest.raises(SourceError, match="cannot read source file .*a.jsonl"):
        ingest.scan_source(str(tmp_path / "src"))
