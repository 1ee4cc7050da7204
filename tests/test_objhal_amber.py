"""Object HalBench and AMBER benchmarks: public-format loaders (local and s3://), bad records
counted with reasons, and scoring through the benchmark adapters against the reference goldens.

The goldens and inputs are tests/fixtures/parity/{objhal,amber}*; tests/test_parity.py checks the
scorers themselves, this file the benchmark plumbing around them.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from bpo_ray.config.evaluate import AmberSettings, ObjHalSettings
from bpo_ray.evaluate.benchmarks import amber, objhal
from bpo_ray.evaluate.sources import BenchmarkDataError

PARITY = Path(__file__).parent / "fixtures" / "parity"
OBJHAL_FILES = ("questions.jsonl", "instances_val2014.json", "captions_val2014.json", "synonyms_refine.txt",
                "wordnet/index.noun", "wordnet/noun.exc")
AMBER_FILES = ("annotations.json", "query_all.json", "relation.json", "safe_words.txt")


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 128, 255)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _objhal_questions_with_bad_rows() -> str:
    lines = (PARITY / "objhal" / "questions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    extra = [
        json.dumps({"image_id": first["image_id"], "question": "Describe it.", "image": base64.b64encode(_jpeg()).decode()}),
        json.dumps({"image_id": "not-a-number", "question": "Describe it."}),  # bad id
        json.dumps({"image_id": 2001}),  # no question
        "{not json",
    ]
    return "\n".join(lines + extra) + "\n"


def _objhal_settings(put: Callable[[str, str], str], cache: str) -> ObjHalSettings:
    uris = {name: put(f"objhal/{name}", (PARITY / "objhal" / name).read_text()) for name in OBJHAL_FILES}
    questions = put("objhal/questions_with_bad.jsonl", _objhal_questions_with_bad_rows())
    wordnet = uris["wordnet/index.noun"].rsplit("/", 1)[0]
    return ObjHalSettings(questions=questions, instances=uris["instances_val2014.json"],
                          captions=uris["captions_val2014.json"], synonyms=uris["synonyms_refine.txt"],
                          wordnet=wordnet, images="/data/coco/val2014", image_cache=cache)


def _check_objhal(settings: ObjHalSettings) -> None:
    loaded = objhal.load(settings, None)
    golden = json.loads((PARITY / "objhal_official_golden.json").read_text())
    n = len(golden["sentences"])
    assert len(loaded.items) == n + 1  # every good record, the base64 one included
    assert loaded.skipped == {"bad_json": 1, "bad_objhal_record": 2}
    assert len(loaded.items) + sum(loaded.skipped.values()) == n + 4  # every input row accounted for
    first = loaded.items[0]
    assert first.image == "/data/coco/val2014/COCO_val2014_000000002000.jpg"
    assert first.meta["objects"] == golden["sentences"][0]["mscoco_gt_words"]
    embedded = loaded.items[-1]
    assert Path(embedded.image).read_bytes() == _jpeg()  # the base64 image, written once to the cache
    assert embedded.meta["image_id"] == first.meta["image_id"]
    # truth for every question equals the reference's, image by image
    for item, expected in zip(loaded.items, golden["sentences"]):
        assert item.meta["objects"] == expected["mscoco_gt_words"]


def test_objhal_loader_reads_the_public_formats_locally(tmp_path):
    def put(name: str, text: str) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    _check_objhal(_objhal_settings(put, str(tmp_path / "cache")))


def test_objhal_loader_reads_the_public_formats_from_s3(s3_server, tmp_path):
    from bpo_ray import storage

    root = f"{s3_server['root']}/objhal-bench"

    def put(name: str, text: str) -> str:
        storage.write_text(f"{root}/{name}", text)
        return f"{root}/{name}"

    _check_objhal(_objhal_settings(put, str(tmp_path / "cache")))


def _answered(items: list, answers: list[str]) -> list[dict[str, Any]]:
    return [{**item.to_row(512, False), "answer": answer, "error": ""} for item, answer in zip(items, answers)]


def test_objhal_adapter_scores_the_reference_numbers(tmp_path):
    settings = ObjHalSettings(questions=str(PARITY / "objhal" / "questions.jsonl"),
                              instances=str(PARITY / "objhal" / "instances_val2014.json"),
                              captions=str(PARITY / "objhal" / "captions_val2014.json"),
                              synonyms=str(PARITY / "objhal" / "synonyms_refine.txt"),
                              wordnet=str(PARITY / "objhal" / "wordnet"), images=str(tmp_path))
    loaded = objhal.load(settings, None)
    answers = [json.loads(line)["text"] for line in (PARITY / "objhal" / "obj_halbench_answer.jsonl").read_text().splitlines()]
    metrics, details = objhal.score(_answered(loaded.items, answers), loaded.info)
    golden = json.loads((PARITY / "objhal_official_golden.json").read_text())
    for key in ("CHAIRs", "CHAIRs_refine", "CHAIRi", "obj_rec", "coco_sentence_num", "avg_word_len"):
        assert metrics[key] == golden["overall_metrics"][key], key
    expected = [[node[-1] for _, node in s["mscoco_hallucinated_words"]] for s in golden["sentences"]]
    assert [d["hallucinated"] for d in details] == expected
    limited = objhal.load(settings, 5)
    assert len(limited.items) == 5
    # a subset without any COCO mention has no CHAIRs_refine (the reference divides by zero)
    nothing, _ = objhal.score(_answered(loaded.items[:1], ["A quiet landscape."]), loaded.info)
    assert nothing["CHAIRs_refine"] is None and nothing["CHAIRs"] == 0.0


def test_objhal_missing_inputs_are_clear_errors(tmp_path):
    from bpo_ray.metrics.wordnet import NounLemmatizer, WordNetMissing

    with pytest.raises(BenchmarkDataError, match="objhal needs"):
        objhal.load(ObjHalSettings(questions="q.jsonl"), None)
    with pytest.raises(WordNetMissing, match="index.noun"):
        NounLemmatizer.from_dir(str(tmp_path))
    bad = ObjHalSettings(questions=str(PARITY / "objhal" / "questions.jsonl"), instances=str(tmp_path / "none.json"),
                         synonyms=str(PARITY / "objhal" / "synonyms_refine.txt"), wordnet=str(PARITY / "objhal" / "wordnet"))
    with pytest.raises(BenchmarkDataError, match="none.json"):
        objhal.load(bad, None)
    instances = json.loads((PARITY / "objhal" / "instances_val2014.json").read_text())
    instances["categories"].append({"id": 999, "name": "hovercraft"})
    instances["annotations"].append({"id": 9999, "image_id": 2000, "category_id": 999})
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(BenchmarkDataError, match="hovercraft"):
        objhal.load(bad.model_copy(update={"instances": str(tmp_path / "instances.json")}), None)


def _golden_stand_ins() -> tuple[Callable[[str], list[str]], Callable[[str, str], float]]:
    """The noun lists and similarity table the AMBER golden run used in place of NLTK's tagger and
    spaCy (neither can be installed here with its data)."""
    responses = {r["id"]: r["response"] for r in json.loads((PARITY / "amber" / "responses.json").read_text())}
    nouns = {responses[int(k)]: v for k, v in json.loads((PARITY / "amber" / "nouns.json").read_text()).items()}
    table = {(a, b): s for a, b, s in json.loads((PARITY / "amber" / "similarity.json").read_text())}
    return (lambda text: list(nouns[text])), (lambda a, b: table.get((a, b), 0.0))


@pytest.fixture
def amber_stand_ins(monkeypatch):
    nouns, similarity = _golden_stand_ins()
    monkeypatch.setattr(amber, "generative_tools", lambda *args: (nouns, similarity))
    return nouns, similarity


def test_amber_generative_fails_fast_without_a_noun_tagger():
    import importlib.util

    if importlib.util.find_spec("nltk") is not None:
        pytest.skip("nltk is installed here; the missing-tagger path is not reachable")
    settings = AmberSettings(annotations=str(PARITY / "amber" / "annotations.json"),
                             queries=str(PARITY / "amber" / "query_all.json"), relation=str(PARITY / "amber" / "relation.json"),
                             images="/img")
    with pytest.raises(BenchmarkDataError, match="install nltk"):
        amber.load(settings, None)


def _amber_settings(put: Callable[[str, str], str], queries: str) -> AmberSettings:
    uris = {name: put(f"amber/{name}", (PARITY / "amber" / name).read_text()) for name in AMBER_FILES}
    return AmberSettings(annotations=uris["annotations.json"], queries=put("amber/queries.json", queries),
                         relation=uris["relation.json"], safe_words=uris["safe_words.txt"], images="/data/amber/image")


def _amber_queries_with_bad_rows() -> str:
    queries = json.loads((PARITY / "amber" / "query_all.json").read_text())
    return json.dumps(queries + [{"id": 9999, "image": "AMBER_1.jpg", "query": "?"}, {"id": 7, "image": "AMBER_1.jpg"}, 5])


def _check_amber(settings: AmberSettings) -> None:
    loaded = amber.load(settings, None)
    annotations = json.loads((PARITY / "amber" / "annotations.json").read_text())
    assert len(loaded.items) == len(annotations)
    assert loaded.skipped == {"bad_amber_query": 3}
    assert loaded.items[0].image == "/data/amber/image/AMBER_1.jpg" and loaded.items[0].category == "generative"
    assert loaded.items[0].meta["hallu"] == annotations[0]["hallu"]
    assert [i.meta["truth"] for i in loaded.items] == [a["truth"] for a in annotations]


def test_amber_loader_reads_the_public_formats_locally_and_from_s3(tmp_path, s3_server, amber_stand_ins):
    from bpo_ray import storage

    def put_local(name: str, text: str) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def put_s3(name: str, text: str) -> str:
        storage.write_text(f"{s3_server['root']}/amber-bench/{name}", text)
        return f"{s3_server['root']}/amber-bench/{name}"

    for put in (put_local, put_s3):
        _check_amber(_amber_settings(put, _amber_queries_with_bad_rows()))


def test_amber_adapter_scores_the_reference_numbers(amber_stand_ins):
    golden = json.loads((PARITY / "amber_official_golden.json").read_text())
    settings = AmberSettings(annotations=str(PARITY / "amber" / "annotations.json"),
                             queries=str(PARITY / "amber" / "query_all.json"), relation=str(PARITY / "amber" / "relation.json"),
                             safe_words=str(PARITY / "amber" / "safe_words.txt"), images="/img")
    loaded = amber.load(settings, None)
    responses = {r["id"]: r["response"] for r in json.loads((PARITY / "amber" / "responses.json").read_text())}
    rows = _answered(loaded.items, [responses[i.meta["amber_id"]] for i in loaded.items])
    nouns, similarity = amber_stand_ins
    metrics, details = amber.score(rows, loaded.info, similarity=similarity, nouns=nouns)
    assert metrics["generative"] == golden["printed"]["Generative Task"] and metrics["similarity"] == "custom"
    assert metrics["discriminative"]["all"] == golden["printed"]["Descriminative Task"]
    assert metrics["discriminative"]["relation"] == golden["printed"]["Relation"]
    assert metrics["answers_not_yes_no"] == 6  # "No.", "yes", "no", " No", "NO", "Yes, there is.": none counts
    # the configured tools (similarity: none = exact matches only) are used when none is passed
    exact, _ = amber.score(rows, loaded.info, similarity=amber.exact_only, nouns=nouns)
    assert exact["generative"]["CHAIR"] > metrics["generative"]["CHAIR"]  # "bus" ~ "car" no longer rescues
    configured, _ = amber.score(rows, loaded.info)
    assert configured["similarity"] == "none" and configured["generative"] == metrics["generative"]
    # discriminative only: no noun extractor or similarity needed
    disc, _ = amber.score([r for r in rows if json.loads(r["meta"])["type"] != "generative"], loaded.info)
    assert "generative" not in disc and disc["discriminative"] == metrics["discriminative"]


def test_amber_generative_queries_need_relation_json():
    settings = AmberSettings(annotations=str(PARITY / "amber" / "annotations.json"),
                             queries=str(PARITY / "amber" / "query_all.json"), images="/img")
    loaded = amber.load(settings, None)
    assert loaded.skipped == {"generative_without_relation": 6}
    assert all(i.category != "generative" for i in loaded.items)


def test_config_accepts_the_new_benchmarks():
    from bpo_ray.config import ConfigError, load_config

    cfg = load_config("tiny", ["evaluate.benchmarks=[objhal,amber]", "evaluate.amber.similarity=spacy",
                               "evaluate.objhal.questions=s3://b/obj_halbench_300_with_image.jsonl"])
    assert cfg.evaluate.benchmarks == ["objhal", "amber"] and cfg.evaluate.amber.spacy_model == "en_core_web_lg"
    with pytest.raises(ConfigError):
        load_config("tiny", ["evaluate.amber.similarity=word2vec"])


def test_amber_normalized_reading_is_reported_beside_the_official_one():
    assert [amber.normalized_yes_no(a) for a in ("No.", " no", "YES!", "Yes, there is.", "Maybe", "")] == [
        "No", "No", "Yes", "Yes", "Maybe", ""]
    annotations = json.loads((PARITY / "amber" / "annotations.json").read_text())
    responses = {r["id"]: r["response"] for r in json.loads((PARITY / "amber" / "responses.json").read_text())}
    rows = [{"id": f"amber/{a['id']}", "answer": responses[a["id"]],
             "meta": json.dumps({"type": a["type"], "truth": a["truth"], "hallu": []})}
            for a in annotations if a["type"] != "generative"]
    metrics, _ = amber.score(rows, {})
    official, lenient = metrics["discriminative"]["all"], metrics["discriminative_normalized"]["all"]
    assert lenient["Accuracy"] > official["Accuracy"]  # "No." and "no" now count


def test_report_shows_objhal_and_amber_columns_only_when_present():
    from bpo_ray.evaluate.report import headline_values, markdown_report

    base = {"benchmarks": {"objhal": {"CHAIRs_refine": 0.5, "CHAIRi": 0.25},
                           "amber": {"generative": {"CHAIR": 10.0, "Cover": 50.0, "Hal": 40.0, "Cog": 3.0},
                                     "discriminative": {"all": {"Accuracy": 70.0, "Precision": 1, "Recall": 1, "F1": 75.5}}}}}
    tuned = {"benchmarks": {"objhal": {"CHAIRs_refine": 0.4, "CHAIRi": 0.2}}}
    values = headline_values({"base": base, "bpo": tuned})
    assert values["base"]["ObjHal Resp ↓"] == 50.0 and values["bpo"]["ObjHal Ment ↓"] == 20.0
    assert values["base"]["AMBER F1"] == 75.5 and values["bpo"]["AMBER F1"] is None
    text = markdown_report({"base": base, "bpo": tuned})
    assert "40.0 (−10.0)" in text and "AMBER Hal ↓" in text
    assert "ObjHal" not in markdown_report({"x": {"benchmarks": {"pope": {}}}})


def test_amber_noun_extractor_wiring_tokens_tags_and_lemmas(monkeypatch):
    """NLTK's tagger data cannot be installed here, so a stand-in ``pos_tag`` (nouns: words ending
    in "s" or listed) checks what surrounds it: NLTK 3.8.1 tokens in, NN* kept, WordNet lemmas out."""
    import sys
    import types

    from bpo_ray.metrics.amber import nltk_noun_extractor

    seen: list[list[str]] = []
    fake = types.ModuleType("nltk")

    def pos_tag(tokens: list[str]) -> list[tuple[str, str]]:
        seen.append(tokens)
        return [(t, "NNS" if t.endswith("s") else "NN" if t in {"man", "dog"} else "DT") for t in tokens]

    fake.pos_tag = pos_tag
    monkeypatch.setitem(sys.modules, "nltk", fake)
    extract = nltk_noun_extractor(str(PARITY / "objhal" / "wordnet"))
    assert extract("A man walks two dogs; glasses.") == ["man", "walk", "dog", "glass"]
    assert seen == [["A", "man", "walks", "two", "dogs", ";", "glasses", "."]]


def test_objhal_judge_listed_objects_are_read_one_by_one_by_the_rules():
    from bpo_ray.metrics.objhal import ObjHalExtractor, score_listed
    from bpo_ray.metrics.wordnet import NounLemmatizer

    extractor = ObjHalExtractor((PARITY / "objhal" / "synonyms_refine.txt").read_text().splitlines(),
                                NounLemmatizer.from_dir(str(PARITY / "objhal" / "wordnet")))
    item = score_listed("...", ["dogs", "toilet seat", "policemen", "cloud"], ["dog", "toilet"], extractor)
    assert item.mentioned == ["dog", "toilet", "person"] and item.hallucinated == ["person"]
    # listed apart, "dog" and "leash"-like neighbours never join into a two-word object
    assert score_listed("...", ["baby", "elephant"], [], extractor).mentioned == ["person", "elephant"]
    assert score_listed("...", ["baby elephant"], [], extractor).mentioned == ["elephant"]


def test_objhal_extractor_setting_and_judge_protocol():
    from bpo_ray.config import load_config
    from bpo_ray.evaluate.pipeline import judge_protocols

    assert "objhal" not in judge_protocols(load_config("tiny", ["evaluate.benchmarks=[objhal]"]))
    assert "objhal" in judge_protocols(load_config("tiny", ["evaluate.benchmarks=[objhal]", "evaluate.objhal.extractor=judge"]))
