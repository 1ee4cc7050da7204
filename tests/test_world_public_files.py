"""The bias world's test split in Object HalBench's and AMBER's public file formats
(``bpo_ray.world.public_files``), read back by the public loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from bpo_ray.world.build import build_world

    out = tmp_path_factory.mktemp("public_world")
    build_world(str(out), seed=3, n_scenes=60, corpus_lines=50)
    return out


def _captions(world: Path) -> list[dict]:
    records = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    return sorted((r for r in records if r["source"] == "caption"), key=lambda r: r["id"])


def _settings(world: Path, name: str, *overrides: str):
    from bpo_ray.config import load_config

    return getattr(load_config("tiny", [f"evaluate.world={world}", *overrides]).evaluate, name)


def test_objhal_files_carry_every_test_scene_and_its_objects(world):
    from bpo_ray.evaluate.benchmarks import objhal

    loaded = objhal.load_world(str(world), _settings(world, "objhal"), None)
    captions = _captions(world)
    assert loaded.info["source"] == "world" and not loaded.skipped
    assert len(loaded.items) == len(captions)
    for item, record in zip(loaded.items, captions):
        assert item.image == str(world / record["image"])
        assert item.meta["objects"] == sorted(record["objects"])
        assert item.question in record["conversations"][0]["value"]
    instances = json.loads((world / "public" / "objhal" / "instances.json").read_text())
    assert len(instances["annotations"]) == sum(len(r["objects"]) for r in captions)


def test_objhal_scores_the_worlds_own_captions_as_the_worlds_chair_does(world):
    """On the world's ground-truth captions nothing is hallucinated and every mention is found:
    Object HalBench's lemmas + synonyms find exactly the objects the world's CHAIR finds."""
    from bpo_ray.evaluate.benchmarks import objhal
    from bpo_ray.metrics.chair import ObjectMentionExtractor

    loaded = objhal.load_world(str(world), _settings(world, "objhal"), None)
    extractor = objhal.make_extractor(loaded.info)
    synonyms = json.loads((world / "world.json").read_text())["synonyms"]
    chair = ObjectMentionExtractor(synonyms)
    captions = _captions(world)
    for record in captions:
        text = record["conversations"][1]["value"]
        assert sorted(set(extractor.caption_words(text).objects)) == sorted({m.canonical for m in chair.extract(text)})
    rows = [{"id": i.id, "answer": r["conversations"][1]["value"], "meta": json.dumps(i.meta)}
            for i, r in zip(loaded.items, captions)]
    metrics, _ = objhal.score(rows, loaded.info)
    assert metrics["CHAIRi"] == 0 and metrics["CHAIRs_refine"] == 0 and metrics["obj_rec"] > 0.9
    wrong = [{**rows[0], "answer": "There are two knives and three mice, and a mug."}]
    truth = set(json.loads(rows[0]["meta"])["objects"])
    _, details = objhal.score(wrong, loaded.info)
    assert details[0]["mentioned"] == ["knife", "mouse", "cup"]  # irregular plurals and a synonym
    assert details[0]["hallucinated"] == [o for o in ("knife", "mouse", "cup") if o not in truth]


def test_amber_files_probe_present_and_absent_prior_partners(world):
    from bpo_ray.evaluate.benchmarks import amber

    loaded = amber.load_world(str(world), _settings(world, "amber"), None)
    captions = _captions(world)
    assert len(loaded.items) == 3 * len(captions) and not loaded.skipped
    partners = {}
    for first, second in json.loads((world / "world.json").read_text())["prior_pairs"]:
        partners[first], partners[second] = second, first
    for n, record in enumerate(captions):
        gen, yes, no = loaded.items[3 * n: 3 * n + 3]
        present = sorted(record["objects"])
        assert gen.meta["type"] == "generative" and gen.meta["truth"] == present
        assert set(gen.meta["hallu"]) == {partners[k] for k in present} - set(present)
        assert (yes.meta["truth"], no.meta["truth"]) == ("yes", "no")
        assert yes.question.split()[3] in present and no.question.split()[3] not in present
        assert gen.image == yes.image == no.image == str(world / record["image"])
    # The world's answers score as AMBER scores them; the lenient reading reads "The cup yes."
    rows = [{"id": i.id, "meta": json.dumps(i.meta),
             "answer": (r["conversations"][1]["value"] if i.meta["type"] == "generative" else
                        f"The {i.question.split()[3]} {i.meta['truth']}.")}
            for i, r in zip(loaded.items, (c for c in captions for _ in range(3)))]
    metrics, _ = amber.score(rows, loaded.info)
    assert metrics["answers_not_yes_no"] == 2 * len(captions) and metrics["discriminative"]["all"]["Accuracy"] == 0
    assert metrics["discriminative_normalized"]["all"]["Accuracy"] == pytest.approx(100, abs=0.1)
    assert metrics["generative"]["CHAIR"] == 0 and metrics["generative"]["Hal"] == 0
    assert metrics["generative"]["Cover"] > 90


def test_files_are_written_once_and_max_items_takes_whole_scenes(world):
    from bpo_ray.evaluate.benchmarks import amber

    marker = world / "public" / "amber" / "done.json"
    amber.load_world(str(world), _settings(world, "amber"), None)
    stamp = marker.stat().st_mtime_ns
    loaded = amber.load_world(str(world), _settings(world, "amber"), 6)
    assert marker.stat().st_mtime_ns == stamp
    assert [i.meta["type"] for i in loaded.items] == ["generative", "discriminative-hallucination",
                                                      "discriminative-hallucination"] * 2


def test_normalized_reading_takes_the_first_yes_or_no_word():
    from bpo_ray.evaluate.benchmarks.amber import normalized_yes_no

    assert [normalized_yes_no(a) for a in ("The cup yes.", "Well, no.", "YES", "I think so")] == [
        "Yes", "No", "Yes", "I think so"]


def test_the_world_dictionary_lemmatizes_the_worlds_plurals(world):
    from bpo_ray.metrics.wordnet import NounLemmatizer
    from bpo_ray.world import vocab
    from bpo_ray.world.public_files import write_objhal_files

    lemmas = NounLemmatizer.from_dir(write_objhal_files(str(world))["wordnet"])
    assert {plural: lemmas.lemmatize(plural) for plural in vocab.PLURALS.values()} == {
        plural: kind for kind, plural in vocab.PLURALS.items()}


def test_source_files_need_their_paths():
    from bpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="objhal.source=objhal needs"):
        load_config("tiny", ["evaluate.objhal.source=objhal"])
    with pytest.raises(ConfigError, match="amber.source=amber needs"):
        load_config("tiny", ["evaluate.amber.source=amber", "evaluate.amber.queries=q.json"])
