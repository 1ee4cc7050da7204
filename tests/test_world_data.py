"""The bias world's data: determinism, splits, record format, and the prior it must (not) obey."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from bpo_ray.metrics.chair import ObjectMentionExtractor, score_chair
from bpo_ray.metrics.pope import parse_pope_official, parse_yes_no
from bpo_ray.world import vocab
from bpo_ray.world.build import SPLITS, build_world
from bpo_ray.world.corpus import build_corpus, partner_cooccurrence, prior_typical_partner
from bpo_ray.world.scenes import describe_scene, render_scene, sample_scene

SMALL = {"n_scenes": 60, "corpus_lines": 300}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(str(out), seed=3, **SMALL)
    return out


def test_vocab_is_closed_and_consistent() -> None:
    assert len(vocab.OBJECT_KINDS) == len(set(vocab.OBJECT_KINDS)) == 14
    assert set(vocab.SYNONYMS.values()) == set(vocab.OBJECT_KINDS)
    assert set(vocab.SHAPE_OF_KIND) == set(vocab.OBJECT_KINDS)
    assert len(set(vocab.SHAPE_OF_KIND.values())) == len(vocab.OBJECT_KINDS)  # one shape per kind
    partners = prior_typical_partner()
    assert set(partners) == set(vocab.OBJECT_KINDS)
    assert all(partners[partners[kind]] == kind != partners[kind] for kind in partners)


def test_build_is_deterministic_to_the_byte(world_dir: Path, tmp_path: Path) -> None:
    build_world(str(tmp_path), seed=3, **SMALL)
    names = [f"{split}.jsonl" for split in SPLITS] + ["corpus.txt"]
    names += [f"images/{p.name}" for p in sorted((world_dir / "images").iterdir())]
    assert len(names) == 4 + SMALL["n_scenes"]
    for name in names:
        assert (world_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name
    first, second = (json.loads((d / "world.json").read_text()) for d in (world_dir, tmp_path))
    first.pop("build_seconds"), second.pop("build_seconds")
    assert first == second


def test_other_seed_gives_other_world(world_dir: Path, tmp_path: Path) -> None:
    build_world(str(tmp_path), seed=4, **SMALL)
    assert (world_dir / "train.jsonl").read_bytes() != (tmp_path / "train.jsonl").read_bytes()


def test_build_skips_when_params_match_and_rebuilds_otherwise(tmp_path: Path) -> None:
    first = build_world(str(tmp_path), seed=0, n_scenes=20, corpus_lines=10)
    stamp = os.stat(tmp_path / "world.json").st_mtime_ns
    assert build_world(str(tmp_path), seed=0, n_scenes=20, corpus_lines=10) == first
    assert os.stat(tmp_path / "world.json").st_mtime_ns == stamp
    rebuilt = build_world(str(tmp_path), seed=0, n_scenes=30, corpus_lines=10)
    assert rebuilt["counts"]["images"] == 30


def test_splits_are_disjoint_by_scene_and_cover_all(world_dir: Path) -> None:
    world = json.loads((world_dir / "world.json").read_text())
    images_of = {split: {r["image"] for r in _read_jsonl(world_dir / f"{split}.jsonl")} for split in SPLITS}
    assert not images_of["train"] & images_of["val"]
    assert not images_of["train"] & images_of["test"]
    assert not images_of["val"] & images_of["test"]
    assert sum(len(images) for images in images_of.values()) == SMALL["n_scenes"]
    assert {split: len(images_of[split]) for split in SPLITS} == world["counts"]["scenes"]
    assert world["counts"]["scenes"] == {"train": 48, "val": 6, "test": 6}


def test_records_are_valid_llava_format(world_dir: Path) -> None:
    sources = set()
    for split in SPLITS:
        for record in _read_jsonl(world_dir / f"{split}.jsonl"):
            assert set(record) == {"id", "image", "conversations", "objects", "source"}
            assert (world_dir / record["image"]).is_file()
            turns = record["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum("<image>" in t["value"] for t in turns) == 1
            assert all(t["value"].strip() for t in turns)
            assert record["objects"] == sorted(set(record["objects"]))
            assert set(record["objects"]) <= set(vocab.OBJECT_KINDS)
            sources.add(record["source"])
            for question, answer in zip(turns[::2], turns[1::2]):
                if question["value"].split("\n")[-1].startswith("Is there"):
                    kind = question["value"].rstrip("?").split()[-4]
                    assert answer["value"] == vocab.existence_answer(kind, kind in record["objects"])
                    assert parse_yes_no(answer["value"]) == ("yes" if kind in record["objects"] else "no")
    assert sources == {"caption", "vqa", "conversation"}


def test_ground_truth_captions_have_no_hallucination(world_dir: Path) -> None:
    records = [r for r in _read_jsonl(world_dir / "train.jsonl") if r["source"] == "caption"]
    captions = [r["conversations"][1]["value"] for r in records]
    report = score_chair(captions, [r["objects"] for r in records], vocab.SYNONYMS)
    assert report.chair_s == 0.0 and report.chair_i == 0.0 and report.recall == 1.0


def test_render_is_deterministic_and_sized() -> None:
    scene = sample_scene(random.Random(7), "s")
    assert render_scene(scene, 32).tobytes() == render_scene(scene, 32).tobytes()
    assert render_scene(scene, 48).size == (48, 48)
    assert len(render_scene(scene, 32).getcolors()) > 1


def test_scenes_ignore_the_prior_while_the_corpus_obeys_it() -> None:
    rng = random.Random(11)
    scenes = [sample_scene(rng) for _ in range(4000)]
    in_scenes = partner_cooccurrence(scene.kinds for scene in scenes)
    assert abs(in_scenes["partner_given_kind"] - in_scenes["base_rate"]) < 0.05
    assert in_scenes["partner_given_kind"] < 0.25

    # Measured on the corpus text itself, through the CHAIR mention extractor.
    extractor = ObjectMentionExtractor(vocab.SYNONYMS)
    corpus = build_corpus(4000, seed=11, partner_rate=0.9)
    in_corpus = partner_cooccurrence({m.canonical for m in extractor.extract(line)} for line in corpus)
    assert abs(in_corpus["partner_given_kind"] - 0.9) < 0.03


def test_train_partner_rate_makes_only_train_scenes_follow_the_prior(tmp_path: Path) -> None:
    build_world(str(tmp_path), seed=3, n_scenes=400, corpus_lines=300, train_partner_rate=0.8)
    independent = tmp_path / "independent"
    build_world(str(independent), seed=3, n_scenes=400, corpus_lines=300)
    by_split = {}
    for out in (tmp_path, independent):
        scenes = _read_jsonl(out / "scenes.jsonl")
        by_split[out] = {split: partner_cooccurrence({o["kind"] for o in s["objects"]} for s in scenes if s["split"] == split)
                         for split in ("train", "test")}
    followed, plain = by_split[tmp_path], by_split[independent]
    assert followed["train"]["partner_given_kind"] > 0.6 > plain["train"]["partner_given_kind"] + 0.3
    # val/test scenes are the very same as without the knob (same images, same records)
    assert (tmp_path / "test.jsonl").read_bytes() == (independent / "test.jsonl").read_bytes()
    assert followed["test"] == plain["test"]
    assert json.loads((tmp_path / "world.json").read_text())["params"]["train_partner_rate"] == 0.8


def test_corpus_is_deterministic_and_in_caption_style() -> None:
    assert build_corpus(50, seed=1) == build_corpus(50, seed=1)
    assert build_corpus(50, seed=1) != build_corpus(50, seed=2)
    caption = describe_scene(sample_scene(random.Random(0)))
    assert all(line.startswith("There ") and line.endswith(".") for line in build_corpus(50) + [caption])


@pytest.mark.parametrize("kind", ["cup", "toothpaste", "mouse"])
def test_existence_answer_names_the_object_then_decides_and_flips(kind: str) -> None:
    yes, no = vocab.existence_answer(kind, True), vocab.existence_answer(kind, False)
    assert yes.split()[:2] == ["The", kind] and yes != no
    assert (parse_yes_no(yes), parse_yes_no(no)) == ("yes", "no")  # strict parse
    assert (parse_pope_official(yes), parse_pope_official(no)) == ("yes", "no")  # POPE's own rule
    assert vocab.flip_existence_answer(yes) == no and vocab.flip_existence_answer(no) == yes
