"""Streaming training ingestion: the driver writes one training copy of the kept pairs, and each
worker reads from it only its share of the seeded epoch order (``epoch_share`` + ``PairShare``).

The training runs themselves (same adapter on rerun, resume, elastic resize, node loss) are in
test_train_ray.py and test_cluster.py; here: which rows a worker holds, that they are the rows the
training loop takes, and that a worker reads nothing more than the row groups holding them.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from bpo_ray.train.data import (TRAIN_COLUMNS, TRAIN_ROW_GROUP, DataPosition, PairsError, PairShare, epoch_share,
                                parquet_rows, read_pairs, select_pairs, write_training_data)
from bpo_ray.config.train import ValidationConfig
from train_pairs import build_pairs_rows, write_pairs


def _taken(position: DataPosition, n: int, world: int, micro: int, seed: int, micro_steps: int) -> dict[int, list]:
    """What each rank takes over ``micro_steps`` micro-steps: the training loop's own calls."""
    out: dict[int, list] = {r: [] for r in range(world)}
    for _ in range(micro_steps):
        rows = position.take(n, micro * world, seed)
        for r in range(world):
            out[r].append((position.epoch, [int(i) for i in rows[r * micro:(r + 1) * micro]]))
    return out


@pytest.mark.parametrize("n,world,micro,start", [(1000, 1, 4, 0), (1000, 2, 4, 0), (1001, 3, 2, 0),
                                                 (1000, 2, 4, 416), (1000, 4, 1, 998)])
def test_each_rank_holds_exactly_the_rows_it_takes_this_epoch(n, world, micro, start):
    seed, gb = 7, world * micro
    position = DataPosition(epoch=2, offset=start, samples_seen=start)
    shares = {r: epoch_share(position, n, gb, seed, r, micro) for r in range(world)}
    taken = _taken(DataPosition(epoch=2, offset=start), n, world, micro, seed, micro_steps=2 * n // gb + 2)
    for r in range(world):
        epoch, rows = shares[r]
        in_epoch = [row for e, batch in taken[r] if e == epoch for row in batch]
        assert rows.tolist() == in_epoch, f"rank {r}"
    union = np.concatenate([shares[r][1] for r in range(world)])
    assert len(set(union.tolist())) == len(union), "ranks' shares overlap"
    assert len(union) == ((n - (start if start + gb <= n else 0)) // gb) * gb


def test_after_a_resize_the_new_ranks_cover_the_rest_of_the_epoch():
    """Elastic resize: 3 workers stop mid-epoch; 2 workers continue from the same position and
    between them hold exactly the rows of the epoch the 3 had not taken."""
    n, seed = 240, 3
    position = DataPosition()
    _taken(position, n, 3, 4, seed, micro_steps=9)  # 108 samples in
    before = set(epoch_share(DataPosition(), n, 12, seed, 0, 4)[1].tolist())  # rank 0 of 3, from the start
    shares = [epoch_share(position, n, 8, seed, r, 4) for r in range(2)]
    rest = set(shares[0][1].tolist()) | set(shares[1][1].tolist())
    order = epoch_order_rows(n, seed)
    assert shares[0][0] == 0 and rest == set(order[108:108 + ((n - 108) // 8) * 8])
    assert not rest & set(order[:108]) and before - set(order[:108]) <= rest | set(order[108 + 128:])


def epoch_order_rows(n: int, seed: int) -> list[int]:
    from bpo_ray.train.data import epoch_order

    return epoch_order(n, seed, 0).tolist()


@pytest.fixture(scope="module")
def copy(tiny_models, tmp_path_factory):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("share")
    pairs = write_pairs(build_pairs_rows(str(root / "world"), n_scenes=300, limit=700), str(root / "gen"))
    processor = AutoProcessor.from_pretrained(tiny_models["mllm"])
    table = read_pairs(pairs)
    prepared = select_pairs(table, pairs, processor, 512, validation=ValidationConfig(n_pairs=40))
    data = write_training_data(table, prepared, str(root / "train-out"))
    return table, prepared, data, processor


def test_the_copy_is_the_kept_rows_in_canonical_order(copy):
    table, prepared, data, _ = copy
    written = pq.read_table(data.train_uri)
    assert written.column_names == list(TRAIN_COLUMNS)
    assert written.to_pylist() == table.take(prepared.keep).select(list(TRAIN_COLUMNS)).to_pylist()
    assert parquet_rows(data.train_uri) == data.train_rows == len(prepared.keep)
    held = pq.read_table(data.held_out_uri)
    assert held.column("id").to_pylist() == prepared.held_out_ids and data.held_out_rows == 40
    assert pq.ParquetFile(data.train_uri).metadata.row_group(0).num_rows == TRAIN_ROW_GROUP


def test_a_worker_reads_only_the_row_groups_of_its_share_and_holds_only_its_rows(copy):
    from bpo_ray.train.logprobs import encode_pair
    from bpo_ray.images import load_image

    table, prepared, data, processor = copy
    kept = table.take(prepared.keep)
    share = PairShare(data.train_uri, data.train_rows, processor, 512)
    rows = list(range(3, 40)) + [data.train_rows - 1]  # the first row group and the last
    share.load(rows)
    assert share.loaded == rows and share.row_groups_read == 2
    for i in (3, data.train_rows - 1):
        row = kept.slice(i, 1).to_pylist()[0]
        got, want = share.encode(i), encode_pair(processor, load_image(row["image"])[0], row["prompt"],
                                                 row["chosen"], row["rejected"], 512)
        assert (got.prompt_ids, got.chosen_answer_ids, got.rejected_answer_ids) == \
            (want.prompt_ids, want.chosen_answer_ids, want.rejected_answer_ids)
        assert got.pixel_values.equal(want.pixel_values)
    with pytest.raises(PairsError, match="not in this worker's loaded share"):
        share.encode(40)
    share.load([300])  # the next epoch's share replaces the last
    assert share.loaded == [300] and share.row_groups_read == 3
    with pytest.raises(PairsError, match="not in this worker's loaded share"):
        share.encode(3)
    with pytest.raises(PairsError, match="asked of"):
        share.load([data.train_rows])


def test_a_copy_that_changed_under_the_run_is_refused(copy, tmp_path):
    _, _, data, processor = copy
    short = str(tmp_path / "train.parquet")
    pq.write_table(pq.read_table(data.train_uri).slice(0, 10), short)
    with pytest.raises(PairsError, match="it changed while training"):
        PairShare(short, data.train_rows, processor, 512).load([1])


def test_a_share_over_s3(copy, s3_server, tmp_path):
    table, prepared, _, processor = copy
    data = write_training_data(table, prepared, f"{s3_server['root']}/train-share")
    share = PairShare(data.train_uri, data.train_rows, processor, 512)
    share.load([0, 299, 300])
    assert share.row_groups_read == 2 and share.reference_logps([0, 300]) is None
