"""Storage and record schemas against local disk and a real S3 server on loopback."""

import json

import pyarrow as pa
import pytest

from bpo_ray import storage
from bpo_ray.schemas import (
    PAIR_SCHEMA, QUARANTINE_SCHEMA, Manifest, ManifestCounts, SchemaError, check_pairs, pair_id,
    pairs_table, quarantine_table, read_manifest, read_parquet, write_manifest, write_parquet,
)


def _pair(i: int, **kw):
    row = dict(
        id=pair_id(f"src{i}", "image_weakened", {"t": 500}), source="world", source_id=f"src{i}",
        image=f"images/{i}.png", image_sha256="ab" * 32, prompt="USER: <image>\nDescribe. ASSISTANT:",
        chosen="a red cup", rejected="a red cup and a saucer", strategy="image_weakened", noise_step=500,
        generator="tiny-llava", sampling=json.dumps({"temperature": 0}), seed=i,
    )
    row.update(kw)
    return row


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    s3 = request.getfixturevalue("s3_server")
    return storage.join(s3["root"], request.node.name.replace("[", "_").replace("]", ""))


def test_bytes_round_trip_and_listing(root):
    storage.write_bytes(storage.join(root, "a/b.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "a/c.txt"), "héllo")
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "a/c.txt")) == "héllo"
    assert storage.list_files(storage.join(root, "a")) == [storage.join(root, "a/b.bin"), storage.join(root, "a/c.txt")]
    assert storage.exists(storage.join(root, "a/c.txt")) and not storage.exists(storage.join(root, "nope"))
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(storage.join(root, "nope"))
    with pytest.raises(storage.StorageError, match="over the 1-byte limit"):
        storage.read_bytes(storage.join(root, "a/b.bin"), max_bytes=1)


def test_localize_caches_a_remote_tree_and_refetches_it_when_rewritten(s3_server, tmp_path):
    """A remote tree is downloaded once; rewritten at the same URI (same sizes, a later second), or
    with a file removed, it is downloaded again instead of served stale; no partial dirs remain."""
    import time
    from pathlib import Path

    uri = storage.join(s3_server["root"], "localize-tree")
    cache = str(tmp_path / "cache")
    storage.write_bytes(storage.join(uri, "adapter.bin"), b"AAAA")
    storage.write_bytes(storage.join(uri, "sub/config.json"), b"{}")
    first = Path(storage.localize(uri, cache))
    assert (first / "adapter.bin").read_bytes() == b"AAAA" and (first / "sub/config.json").read_bytes() == b"{}"
    marker = (first / ".complete").stat().st_mtime_ns
    assert Path(storage.localize(uri, cache)) == first and (first / ".complete").stat().st_mtime_ns == marker
    time.sleep(1.1)  # S3 modification times have one-second resolution
    storage.write_bytes(storage.join(uri, "adapter.bin"), b"BBBB")  # a second run, same shapes
    assert (Path(storage.localize(uri, cache)) / "adapter.bin").read_bytes() == b"BBBB"
    storage.delete(storage.join(uri, "sub/config.json"))
    again = Path(storage.localize(uri, cache))
    assert not (again / "sub/config.json").exists() and (again / "adapter.bin").read_bytes() == b"BBBB"
    assert sorted(p.name for p in Path(cache).iterdir()) == [again.name]  # no .partial-* left behind
    with pytest.raises(storage.StorageError, match="nothing there"):
        storage.localize(storage.join(s3_server["root"], "no-such-tree"), cache)


def test_pairs_write_read_round_trip(root):
    table = pairs_table([_pair(i) for i in range(5)] + [_pair(9, noise_step=None, strategy="error_injection")])
    uri = storage.join(root, "pairs/part-0.parquet")
    write_parquet(table, uri, PAIR_SCHEMA)
    back = read_parquet(storage.join(root, "pairs"), PAIR_SCHEMA)
    assert back.num_rows == 6
    assert back.column("source_id").to_pylist() == [f"src{i}" for i in range(5)] + ["src9"]
    assert back.column("noise_step").to_pylist()[-1] is None
    assert back.column("ref_chosen_logp").null_count == 6


def test_quarantine_and_manifest_round_trip(root):
    q = quarantine_table([{"source_id": "x", "stage": "read", "reason": "corrupt image", "raw": "{}"}])
    write_parquet(q, storage.join(root, "quarantine/q.parquet"), QUARANTINE_SCHEMA)
    assert read_parquet(storage.join(root, "quarantine"), QUARANTINE_SCHEMA).column("reason").to_pylist() == ["corrupt image"]
    m = Manifest(stage="generate", counts=ManifestCounts(items_in=3, paired=1, filtered=1, quarantined=1), config={"a": 1})
    write_manifest(m, storage.join(root, "manifest.json"))
    assert read_manifest(storage.join(root, "manifest.json")) == m


def test_schema_violations_are_named():
    good = pairs_table([_pair(0)])
    with pytest.raises(SchemaError, match=r"missing columns \['chosen'\]"):
        check_pairs(good.drop_columns(["chosen"]))
    with pytest.raises(SchemaError, match=r"unexpected columns \['extra'\]"):
        check_pairs(good.append_column("extra", pa.array([1])))
    with pytest.raises(SchemaError, match="column 'rejected' has 1 nulls"):
        pairs_table([_pair(0, rejected=None)])
    with pytest.raises(SchemaError, match="unknown strategy"):
        pairs_table([_pair(0, strategy="made_up")])


def test_manifest_must_account_for_every_item():
    with pytest.raises(ValueError, match="does not account for every item"):
        ManifestCounts(items_in=5, paired=1, filtered=1, quarantined=1)


def test_pair_id_is_stable_and_sensitive():
    a = pair_id("s", "image_weakened", {"t": 500, "seed": 1})
    assert a == pair_id("s", "image_weakened", {"seed": 1, "t": 500})
    assert a != pair_id("s", "image_weakened", {"t": 600, "seed": 1})
    assert a != pair_id("s", "error_injection", {"t": 500, "seed": 1})
