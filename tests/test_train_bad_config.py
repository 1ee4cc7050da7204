"""Train stage: bad configuration and bad pairs fail fast, before any Ray worker starts, with a
message that names the problem (the `bpo-ray train` command exits 2)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo_ray.config import ConfigError, load_config
from bpo_ray.train import cli
from train_pairs import build_pairs_rows, write_pairs


@pytest.fixture(scope="module")
def good_pairs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pairs")
    return write_pairs(build_pairs_rows(str(root / "world"), n_scenes=8, limit=8), str(root / "gen"))


def _train(capsys, tiny_models, pairs: str, out: str, *overrides: str) -> tuple[int, str]:
    argv = ["--pairs", pairs, "--out", out, "--set", f"models.mllm={tiny_models['mllm']}"]
    for o in overrides:
        argv += ["--set", o]
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # config errors exit from argparse-level helpers
        rc = exc.code
    err = capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "checkpoints")), "nothing may start for a bad config"
    return rc, err


@pytest.mark.parametrize("override,needle", [
    ("train.beta=0", "'train.beta' = 0"),
    ("train.beta=-0.1", "'train.beta' = -0.1"),
    ("train.zero_stage=4", "ZeRO stage 4 does not exist"),
    ("train.loss=conservative", "needs label_smoothing in (0, 0.5)"),
    ("train.precision=bf16", "bf16 needs use_gpu"),
    ("train.validation.fraction=1.5", "'train.validation.fraction' = 1.5: Input should be less than 1"),
    ("train.validation.n_pairs=0", "'train.validation.n_pairs' = 0"),
    ("train.validation.every_steps=0", "'train.validation.every_steps' = 0"),
    ("train.validation.metric=accuracy", "'train.validation.metric' = 'accuracy'"),
    ("train.validation.mode=highest", "'train.validation.mode' = 'highest'"),
    ("train.validation.chosen_drop_warn=-1", "'train.validation.chosen_drop_warn' = -1"),
    ("train.validation={fraction: 0.1, n_pairs: 4}", "set fraction (0.1) or n_pairs (4), not both"),
    ("train.validation={chosen_drop_warn: 3, chosen_drop_stop: 1}", "chosen_drop_stop (1.0) is below chosen_drop_warn"),
    ("train.validation.every_step=5", "unknown key 'train.validation.every_step' (did you mean 'train.validation.every_steps'?)"),
])
def test_bad_values_fail_at_config_load(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert needle in str(info.value)


def test_cli_reports_config_error(capsys, tiny_models, good_pairs, tmp_path):
    rc, err = _train(capsys, tiny_models, good_pairs, str(tmp_path / "o"), "train.zero_stage=7")
    assert rc == 2 and "ZeRO stage 7 does not exist" in err


def test_unknown_target_modules_list_the_available_ones(capsys, tiny_models, good_pairs, tmp_path):
    rc, err = _train(capsys, tiny_models, good_pairs, str(tmp_path / "o"), "train.lora.target_modules=[q_proj,qkv_proj,fc1]")
    assert rc == 2
    assert "['qkv_proj', 'fc1'] are not linear layers of the language model" in err
    assert "available: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err


def test_empty_pairs(capsys, tiny_models, tmp_path):
    from bpo_ray.schemas import PAIR_SCHEMA

    os.makedirs(tmp_path / "p" / "pairs")
    pq.write_table(PAIR_SCHEMA.empty_table(), tmp_path / "p" / "pairs" / "part-0.parquet")
    rc, err = _train(capsys, tiny_models, str(tmp_path / "p"), str(tmp_path / "o"))
    assert rc == 2 and "0 rows" in err


def test_no_pairs_at_path(capsys, tiny_models, tmp_path):
    rc, err = _train(capsys, tiny_models, str(tmp_path / "nowhere"), str(tmp_path / "o"))
    assert rc == 2 and "path does not exist" in err


def test_schema_violating_pairs(capsys, tiny_models, good_pairs, tmp_path):
    table = pq.read_table(os.path.join(good_pairs, "pairs", "part-0.parquet"))
    bad = table.drop_columns(["rejected"])
    os.makedirs(tmp_path / "p" / "pairs")
    pq.write_table(bad, tmp_path / "p" / "pairs" / "part-0.parquet")
    rc, err = _train(capsys, tiny_models, str(tmp_path / "p"), str(tmp_path / "o"))
    assert rc == 2 and "do not match the pair schema" in err and "missing columns ['rejected']" in err

    nulls = table.set_column(table.schema.get_field_index("chosen"), "chosen",
                             pa.array([None] + table.column("chosen").to_pylist()[1:], pa.string()))
    pq.write_table(nulls, tmp_path / "p" / "pairs" / "part-0.parquet")
    rc, err = _train(capsys, tiny_models, str(tmp_path / "p"), str(tmp_path / "o"))
    assert rc == 2 and "column 'chosen' has 1 nulls" in err


def test_pairs_with_missing_images(capsys, tiny_models, good_pairs, tmp_path):
    rows = build_pairs_rows(str(tmp_path / "world"), n_scenes=8, limit=6)
    gone = rows[0]["image"]
    write_pairs(rows, str(tmp_path / "p"))
    os.remove(gone)
    rc, err = _train(capsys, tiny_models, str(tmp_path / "p"), str(tmp_path / "o"))
    assert rc == 2 and "images that do not exist" in err and gone in err and rows[0]["id"] in err


def test_deepspeed_file_disagreeing_with_stage(capsys, tiny_models, good_pairs, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    rc, err = _train(capsys, tiny_models, good_pairs, str(tmp_path / "o"), f"train.deepspeed_config={ds}", "train.zero_stage=2")
    assert rc == 2 and "sets ZeRO stage 3 but train.zero_stage is 2" in err


def test_strategies_filter_keeps_only_the_named_negatives(tiny_models, tmp_path):
    from transformers import AutoProcessor
    from bpo_ray.schemas import pair_id
    from bpo_ray.train.data import prepare_pairs

    rows = build_pairs_rows(str(tmp_path / "world"), n_scenes=8, limit=6)
    for row in rows[:2]:  # two pairs whose negative came from the image-weakened sampler
        row.update(strategy="image_weakened", noise_step=500, id=pair_id(row["source_id"], "image_weakened", {}))
    write_pairs(rows, str(tmp_path / "p"))
    processor = AutoProcessor.from_pretrained(tiny_models["mllm"])
    only_iw = prepare_pairs(str(tmp_path / "p"), processor, 256, strategies=["image_weakened"])
    assert _kept_ids(tmp_path / "p", only_iw) == {r["id"] for r in rows[:2]} and only_iw.num_pairs == 6
    assert sorted(only_iw.dropped["strategy_not_selected"]) == sorted(r["id"] for r in rows[2:])
    every = prepare_pairs(str(tmp_path / "p"), processor, 256)
    assert every.keep == list(range(6)) and not every.dropped


def _kept_ids(pairs_dir, prepared) -> set[str]:
    from bpo_ray.train.data import read_pairs

    ids = read_pairs(str(pairs_dir)).column("id").to_pylist()
    return {ids[i] for i in prepared.keep}


def test_training_order_follows_content_not_files_or_ids(tiny_models, tmp_path):
    """The reference pass rewrites pairs in Ray Data's row order, and ids name the run's location:
    neither may change which pair a training step sees."""
    import pyarrow.parquet as pq

    from bpo_ray.train.data import read_pairs

    rows = build_pairs_rows(str(tmp_path / "world"), n_scenes=8, limit=6)
    write_pairs(rows, str(tmp_path / "a"))
    moved = [dict(r, id=f"elsewhere-{k}") for k, r in enumerate(reversed(rows))]
    write_pairs(moved[:3], str(tmp_path / "b"))
    pq.write_table(pq.read_table(tmp_path / "b" / "pairs" / "part-0.parquet"), tmp_path / "b" / "pairs" / "part-1.parquet")
    write_pairs(moved[3:], str(tmp_path / "c"))
    (tmp_path / "c" / "pairs" / "part-0.parquet").rename(tmp_path / "b" / "pairs" / "part-1.parquet")
    content = lambda t: list(zip(*(t.column(k).to_pylist() for k in ("source_id", "prompt", "chosen", "rejected"))))
    assert content(read_pairs(str(tmp_path / "a"))) == content(read_pairs(str(tmp_path / "b")))


def test_noise_steps_filter_keeps_other_strategies_and_the_named_steps(tiny_models, tmp_path):
    from transformers import AutoProcessor
    from bpo_ray.schemas import pair_id
    from bpo_ray.train.data import PairsError, prepare_pairs

    rows = build_pairs_rows(str(tmp_path / "world"), n_scenes=8, limit=6)
    for row, step in zip(rows[:3], (0, 500, 500)):  # image-weakened pairs at steps 0, 500, 500
        row.update(strategy="image_weakened", noise_step=step, id=pair_id(row["source_id"], "image_weakened", {"t": step}))
    write_pairs(rows, str(tmp_path / "p"))
    processor = AutoProcessor.from_pretrained(tiny_models["mllm"])
    no_weakening = prepare_pairs(str(tmp_path / "p"), processor, 256, noise_steps=[0])
    assert _kept_ids(tmp_path / "p", no_weakening) == {rows[i]["id"] for i in (0, 3, 4, 5)}
    assert sorted(no_weakening.dropped["noise_step_not_selected"]) == sorted(r["id"] for r in rows[1:3])
    weakened = prepare_pairs(str(tmp_path / "p"), processor, 256, strategies=["image_weakened"], noise_steps=[500])
    assert _kept_ids(tmp_path / "p", weakened) == {rows[1]["id"], rows[2]["id"]}
    with pytest.raises(PairsError, match="noise_steps"):
        prepare_pairs(str(tmp_path / "p"), processor, 256, strategies=["image_weakened"], noise_steps=[900])


def test_strategies_filter_matching_nothing_is_an_error(capsys, tiny_models, good_pairs, tmp_path):
    rc, err = _train(capsys, tiny_models, good_pairs, str(tmp_path / "o"), "train.strategies=[image_weakened]")
    assert rc == 2 and "train.strategies=['image_weakened']" in err and "error_injection" in err


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.strategies=[image_weakend]"])
    assert "train.strategies" in str(info.value)


def test_holding_out_every_pair_is_an_error(capsys, tiny_models, good_pairs, tmp_path):
    rc, err = _train(capsys, tiny_models, good_pairs, str(tmp_path / "o"), "train.validation.n_pairs=8")
    assert rc == 2 and "train.validation holds out 8 of the 8 usable pairs, leaving none to train on" in err
