"""Evaluate stage, fast tier: scorers and judge-reply parsers on hand-checked examples, loaders for
every public format (local and s3://) and the bias world, the report, and per-item failure
recording against real HTTP servers (no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bpo_ray.evaluate.benchmarks import chair, llava_bench, mmvet, pope
from tests.serve_support import AppServer

# ---------------------------------------------------------------------------------------------
# MM-Vet


@pytest.mark.parametrize("reply, grade", [
    ("0.8", 0.8), ("1.0", 1.0), ("0", 0.0), ("0.3 (partly right)", 0.3), ("Correctness: 0.6", 0.6),
    ("0.7.", 0.7), ("**0.9**", 0.9), ("50%", 0.5), (".5", 0.5),
    ("8", None), ("-0.2", None), ("1.5", None), ("", None), ("The grade is", None),
])
def test_mmvet_grade_parsing(reply, grade):
    assert mmvet.parse_grade(reply) == grade


def test_mmvet_grader_query_follows_the_protocol_layout():
    query = mmvet.grader_query("What is x?", "-1<AND>-5", "x = -1")
    assert query.startswith(mmvet.GRADER_PROMPT.rstrip("\n"))
    # prompt, a blank line, then the item's row with an empty last cell; <AND> padded with spaces.
    assert query.endswith("| 1.0\n\nWhat is x? | -1 <AND> -5 | x = -1 | ")
    assert query.count("How many apples are on the plate?") == 2 and query.count("Describe the scene.") == 2
    retry = mmvet.grader_query("What is x?", "-1", "x = -1", attempt=1)
    assert retry.endswith(" | \nPredict the correctness of the answer (digit): ")
    requests = [mmvet.grade_request({"question": "q", "reference": "r", "answer": "a"}, i) for i in range(5)]
    # As MM-Vet: 3 tokens; the first re-ask still at temperature 0, then +0.5 per re-ask.
    assert [r.temperature for r in requests] == [0.0, 0.0, 0.5, 1.0, 1.5] and requests[0].max_tokens == 3


def test_mmvet_capability_totals_hand_checked():
    grades = [1.0, 0.5, 0.0, 0.4]
    caps = [["rec"], ["ocr", "rec"], ["ocr"], ["math"]]
    totals = mmvet.capability_totals(grades, caps)
    # rec: (1.0 + 0.5) / 2; ocr: (0.5 + 0.0) / 2; math: 0.4 / 1; total: 1.9 / 4 -- all x 100.
    assert totals["per_capability"] == pytest.approx({"rec": 75.0, "ocr": 25.0, "math": 40.0})
    assert list(totals["per_capability"]) == ["rec", "ocr", "math"]  # MM-Vet's column order
    assert totals["total"] == pytest.approx(47.5)
    assert totals["per_integration"] == pytest.approx({"rec": 100.0, "ocr_rec": 50.0, "ocr": 0.0, "math": 40.0})
    assert totals["n_per_capability"] == {"rec": 2, "ocr": 2, "math": 1}
    with pytest.raises(ValueError):
        mmvet.capability_totals([1.0], [])


def test_mmvet_score_counts_unparsed_grades_as_zero():
    rows = [{"id": "a", "judge_value": "1.0", "judge_error": "", "meta": json.dumps({"capabilities": ["rec"]})},
            {"id": "b", "judge_value": "0.0", "judge_error": "unparsable", "meta": json.dumps({"capabilities": ["rec"]})}]
    metrics, details = mmvet.score(rows)
    assert metrics["total"] == pytest.approx(50.0) and metrics["n_unparsed_grades"] == 1
    assert [d["grade"] for d in details] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# LLaVA-Bench


@pytest.mark.parametrize("reply, pair", [
    ("8 6\nAssistant 1 is more detailed.", [8.0, 6.0]), ("8,6", [8.0, 6.0]), ("(7, 9)", [7.0, 9.0]),
    ("Assistant 1: 8 Assistant 2: 6", [8.0, 6.0]), ("8/10 5/10", [8.0, 5.0]), ("\n9.5 3\n", [9.5, 3.0]),
    ("8 6.", [8.0, 6.0]),
    ("8 6 7", None), ("8", None), ("Both are good.\n8 6", None), ("11 2", None), ("", None),
])
def test_llava_bench_score_pair_parsing(reply, pair):
    assert llava_bench.parse_score_pair(reply) == pair


def test_llava_bench_relative_score_is_ratio_of_means_hand_checked():
    pairs = [(8, 6), (10, 5), (6, 6)]
    scores = llava_bench.relative_scores(pairs, ["conv", "conv", "detail"])
    # conv: mean candidate 5.5 / mean reference 9 (not the mean of ratios, 62.5).
    assert scores["per_category"]["conv"]["relative"] == pytest.approx(100 * 5.5 / 9)
    assert scores["per_category"]["detail"]["relative"] == pytest.approx(100.0)
    assert scores["all"]["relative"] == pytest.approx(100 * (17 / 3) / 8)
    assert scores["all"]["n"] == 3 and scores["per_category"]["conv"]["reference_mean"] == pytest.approx(9.0)
    assert list(scores["per_category"]) == ["conv", "detail"]


def test_llava_bench_review_puts_reference_first():
    request = llava_bench.review_request({"question": "What is it?", "reference": "A red cup.", "answer": "A dog.",
                                          "meta": json.dumps({"context": "There is a red cup."})}, 0)
    system, user = request.messages
    assert system["content"] == llava_bench.SYSTEM_PROMPT
    content = user["content"]
    assert content.startswith("[Context]\nThere is a red cup.\n\n[Question]\nWhat is it?\n\n")
    assert content.index("[Assistant 1]\nA red cup.\n\n[End of Assistant 1]") < content.index("[Assistant 2]\nA dog.")
    assert content.endswith(f"[System]\n{llava_bench.RULE_PROMPT}\n\n")
    assert request.temperature == 0.2


# ---------------------------------------------------------------------------------------------
# CHAIR


@pytest.mark.parametrize("reply, names", [
    ("cup, saucer, dog leash", ["cup", "saucer", "dog leash"]),
    ("Objects: a mug; the keyboard.", ["mug", "keyboard"]),
    ("- cup\n- fork\n", ["cup", "fork"]),
    ("1. pen\n2. paper", ["pen", "paper"]),
    ("none", []), ("", []),
])
def test_chair_object_list_parsing(reply, names):
    assert chair.parse_object_list(reply) == names


def test_chair_judge_extraction_handles_negation_rules_do_not():
    from bpo_ray.world import vocab

    answer = "There is a red cup. There is no saucer. A mug is on the left."
    rows = [{"id": "a", "answer": answer, "judge_value": json.dumps(["cup", "mug"]),
             "meta": json.dumps({"objects": ["cup"]})},
            {"id": "b", "answer": "A dog with its leash.", "judge_value": json.dumps(["dog", "leash"]),
             "meta": json.dumps({"objects": ["dog", "key"]})}]
    info = {"synonyms": vocab.SYNONYMS, "prior_partners": vocab.prior_partners()}
    rules, _ = chair.score(rows, info, "rules")
    judged, details = chair.score(rows, info, "judge")
    # Rules: mentions cup, saucer, cup(mug) | dog, leash -> hallucinated saucer, leash: 2 of 5, both captions.
    assert (rules["n_mentions"], rules["n_hallucinated_mentions"]) == (5, 2)
    assert rules["chair_i"] == pytest.approx(0.4) and rules["chair_s"] == pytest.approx(1.0)
    # Judge: the negated saucer is not listed -> only the leash: 1 of 4 mentions, 1 of 2 captions.
    assert judged["chair_i"] == pytest.approx(0.25) and judged["chair_s"] == pytest.approx(0.5)
    assert judged["prior_typical_share"] == pytest.approx(1.0)  # the leash is the dog's prior partner
    assert details[1]["hallucinated"] == ["leash"] and judged["extractor"] == "judge"



def test_chair_coco_scoring_uses_the_configured_matching():
    lines = ["person, man, baby", "bus, minibus", "bird", "tie, bow tie"]
    rows = [{"id": "a", "answer": "A baby bird near a bus and two ties.", "meta": json.dumps({"objects": ["bird", "bus"]})}]
    by_mode = {}
    for matching in ("rohrbach", "corrected", "table"):
        info = {"source": "coco", "synonyms": chair.synonyms_from_lines(lines), "synonym_lines": lines,
                "matching": matching}
        metrics, details = chair.score(rows, info, "rules")
        by_mode[matching] = details[0]["mentioned"]
        assert metrics["matching"] == matching
    assert by_mode == {"rohrbach": ["bird"],  # Pattern reads "bus" as "bu", "ties" as "ty"
                       "corrected": ["bird", "bus", "tie"],
                       "table": ["person", "bird", "bus", "tie"]}  # no baby-animal rule


# ---------------------------------------------------------------------------------------------
# Loaders: public formats (local and s3://)


def _write_public_benchmarks(put) -> dict[str, str]:
    """Small files in each public format; ``put(name, text)`` stores one and returns its URI."""
    uris = {}
    uris["pope_random"] = put("coco_pope_random.json", "\n".join([
        json.dumps({"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog in the image?", "label": "yes"}),
        "{not json",
        json.dumps({"question_id": 2, "image": "COCO_1.jpg", "text": "Is there a cat in the image?", "label": "maybe"}),
        json.dumps({"question_id": 3, "image": "COCO_2.jpg", "text": "Is there a cat in the image?", "label": "no"}),
    ]) + "\n")
    uris["pope_adversarial"] = put("coco_pope_adversarial.json", json.dumps(
        {"question_id": 9, "image": "COCO_2.jpg", "text": "Is there a fork in the image?", "label": "No"}) + "\n")
    uris["mmvet"] = put("mm-vet.json", json.dumps({
        "v1_0": {"imagename": "v1_0.png", "question": "What is x?", "answer": "-1<AND>-5", "capability": ["ocr", "math"]},
        "v1_1": {"imagename": "v1_1.png", "question": "Which animal?", "answer": "dog", "capability": ["rec"]},
        "v1_2": {"imagename": "v1_2.png", "question": "", "answer": "x", "capability": ["rec"]},
    }))
    uris["lb_questions"] = put("questions.jsonl", "\n".join(json.dumps(q) for q in [
        {"question_id": 0, "image": "001.jpg", "text": "What is in the bowl?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "Describe the image.", "category": "detail"},
        {"question_id": 2, "image": "002.jpg", "text": "Why?", "category": "complex"},
        {"question_id": 3, "image": "003.jpg", "text": "No context for me.", "category": "conv"},
    ]))
    uris["lb_answers"] = put("answers_gpt4.jsonl", "\n".join(json.dumps(a) for a in [
        {"question_id": 0, "text": "Ramen."}, {"question_id": 1, "text": "A bowl of ramen."},
        {"question_id": 3, "text": "Something."}]))
    uris["lb_context"] = put("context.jsonl", "\n".join(json.dumps(c) for c in [
        {"image": "001.jpg", "caption": "A bowl of ramen on a table."},
        {"image": "002.jpg", "caption": ["First sentence.", "Second sentence."]}]))
    uris["instances"] = put("instances_val2014.json", json.dumps({
        "images": [{"id": 42, "file_name": "COCO_val2014_42.jpg"}, {"id": 7, "file_name": "COCO_val2014_7.jpg"},
                   {"id": 9, "file_name": "COCO_val2014_9.jpg"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}],
        "annotations": [{"image_id": 42, "category_id": 18}, {"image_id": 42, "category_id": 1},
                        {"image_id": 7, "category_id": 62}]}))
    uris["captions"] = put("captions_val2014.json", json.dumps({
        "annotations": [{"image_id": 7, "caption": "A man sits on a chair."}]}))
    uris["synonyms"] = put("synonyms.txt", "person, man, woman, people\ndog, puppy\nchair, seat\n")
    return uris


def _check_public_loaders(uris: dict[str, str], images: str) -> None:
    from bpo_ray.config.evaluate import ChairSettings, LlavaBenchSettings, MMVetSettings, PopeSettings

    loaded = pope.load_official(PopeSettings(source="pope", images=images, files={
        "random": uris["pope_random"], "adversarial": uris["pope_adversarial"]}), None)
    assert [(i.id, i.category, i.reference) for i in loaded.items] == [
        ("pope/random-1", "random", "yes"), ("pope/random-3", "random", "no"), ("pope/adversarial-9", "adversarial", "no")]
    assert loaded.skipped == {"bad_json": 1, "bad_pope_record": 1}
    # Nothing is lost: each unusable input is kept, with its reason, for skipped.jsonl.
    assert [(r["reason"], r["raw"]) for r in loaded.skipped_records] == [
        ("bad_json", "{not json"),
        ("bad_pope_record", json.dumps({"image": "COCO_1.jpg", "label": "maybe", "question_id": 2,
                                        "text": "Is there a cat in the image?"}, sort_keys=True))]
    assert loaded.items[0].image == f"{images}/COCO_1.jpg"

    loaded = mmvet.load_official(MMVetSettings(source="mmvet", data=uris["mmvet"], images=images), None)
    assert [i.id for i in loaded.items] == ["mmvet/v1_0", "mmvet/v1_1"] and loaded.skipped == {"bad_mmvet_record": 1}
    assert loaded.items[0].meta == {"capabilities": ["math", "ocr"]} and loaded.items[0].reference == "-1<AND>-5"

    loaded = llava_bench.load_official(LlavaBenchSettings(
        source="llava_bench", questions=uris["lb_questions"], answers=uris["lb_answers"], context=uris["lb_context"],
        images=images), None)
    assert [(i.id, i.category, i.reference) for i in loaded.items] == [
        ("llava_bench/0", "conv", "Ramen."), ("llava_bench/1", "detail", "A bowl of ramen.")]
    assert loaded.items[0].meta["context"] == "A bowl of ramen on a table."
    assert loaded.skipped == {"no_reference_answer": 1, "no_context": 1}

    loaded = chair.load_coco(ChairSettings(source="coco", instances=uris["instances"], captions=uris["captions"],
                                           images=images, synonyms=uris["synonyms"]), None)
    # Image 7's truth gets "person" from its caption ("a man"), as CHAIR does; image 9 has no objects.
    assert [(i.id, i.meta["objects"]) for i in loaded.items] == [("chair/7", ["chair", "person"]),
                                                                ("chair/42", ["dog", "person"])]
    assert loaded.skipped == {"no_objects": 1}
    assert [i.question for i in loaded.items] == list(chair.DESCRIPTION_PROMPTS[:2])
    assert loaded.info["synonyms"]["puppy"] == "dog"


def test_public_format_loaders_local(tmp_path):
    def put(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    _check_public_loaders(_write_public_benchmarks(put), str(tmp_path / "images"))


def test_public_format_loaders_s3(s3_server):
    from bpo_ray import storage

    root = f"{s3_server['root']}/benchmarks"

    def put(name: str, text: str) -> str:
        storage.write_text(f"{root}/{name}", text)
        return f"{root}/{name}"

    _check_public_loaders(_write_public_benchmarks(put), f"{root}/images")


def test_missing_benchmark_file_is_a_clear_error(tmp_path):
    from bpo_ray.config.evaluate import MMVetSettings
    from bpo_ray.evaluate.sources import BenchmarkDataError

    with pytest.raises(BenchmarkDataError, match="mm-vet.json"):
        mmvet.load_official(MMVetSettings(source="mmvet", data=str(tmp_path / "mm-vet.json"), images="x"), None)
    with pytest.raises(BenchmarkDataError, match="bpo-ray world"):
        chair.load_world(str(tmp_path), chair.ChairSettings(), None)


def test_config_requires_files_for_public_sources():
    from bpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="chair.instances"):
        load_config("tiny", ["evaluate.chair.source=coco"])
    with pytest.raises(ConfigError, match="pope.files"):
        load_config("tiny", ["evaluate.pope.source=pope"])
    cfg = load_config("tiny", ["evaluate.mmvet.source=mmvet", "evaluate.mmvet.data=s3://b/mm-vet.json",
                               "evaluate.mmvet.images=s3://b/images"])
    assert cfg.evaluate.mmvet.data == "s3://b/mm-vet.json"


# ---------------------------------------------------------------------------------------------
# Loaders: the bias world


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    from bpo_ray.world.build import build_world

    out = tmp_path_factory.mktemp("world_eval")
    build_world(str(out), seed=1, n_scenes=80, corpus_lines=20)
    return out


def _test_records(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]


def test_world_chair_items_one_per_test_scene(small_world):
    from bpo_ray.config.evaluate import ChairSettings
    from bpo_ray.world.scenes import CAPTION_PROMPTS

    records = _test_records(small_world)
    loaded = chair.load_world(str(small_world), ChairSettings(), None)
    scenes = {r["image"] for r in records}
    assert len(loaded.items) == len(scenes) == 8
    for item in loaded.items:
        assert Path(item.image).is_file() and item.question in CAPTION_PROMPTS
        truth = next(r["objects"] for r in records if str(small_world / r["image"]) == item.image)
        assert item.meta["objects"] == sorted(truth)
    custom = chair.load_world(str(small_world), ChairSettings(prompts=["P1", "P2"]), 3)
    assert [i.question for i in custom.items] == ["P1", "P2", "P1"]


def test_world_pope_probes_balanced_with_prior_partner_as_adversarial(small_world):
    from bpo_ray.config.evaluate import PopeSettings
    from bpo_ray.world import vocab

    loaded = pope.load_world(str(small_world), PopeSettings(n_per_image=2, prompt_suffix="Answer yes or no."), None)
    partners = vocab.prior_partners()
    by_split: dict[str, list] = {}
    for item in loaded.items:
        by_split.setdefault(item.category, []).append(item)
        assert item.question.endswith("in the image?\nAnswer yes or no.")
    assert set(by_split) == {"random", "popular", "adversarial"}
    for items in by_split.values():
        labels = [i.meta["label"] for i in items]
        assert labels.count("yes") == labels.count("no") > 0
    records = {str(small_world / r["image"]): set(r["objects"]) for r in _test_records(small_world)}
    for item in by_split["adversarial"]:
        present = records[item.image]
        if item.meta["label"] == "no":
            assert item.meta["object"] not in present
            absent_partners = {partners[k] for k in present} - present
            if len(absent_partners) >= 2:  # enough partners to fill this image's negatives
                assert item.meta["object"] in absent_partners
    limited = pope.load_world(str(small_world), PopeSettings(), 4)
    assert Counter(i.category for i in limited.items) == {"random": 4, "popular": 4, "adversarial": 4}


def test_world_mmvet_and_llava_bench_items(small_world):
    from bpo_ray.config.evaluate import LlavaBenchSettings, MMVetSettings

    loaded = mmvet.load_world(str(small_world), MMVetSettings(), 6)
    kinds = [i.meta["capabilities"] for i in loaded.items]
    assert len(loaded.items) == 6 and kinds[1::2] == [["rec", "gen"]] * 3  # VQA and captions alternate
    assert all(i.reference for i in loaded.items)
    lb = llava_bench.load_world(str(small_world), LlavaBenchSettings(), 5)
    assert [i.category for i in lb.items] == ["conv", "detail", "complex", "conv", "detail"]
    captions = {str(small_world / r["image"]): r["conversations"][1]["value"]
                for r in _test_records(small_world) if r["source"] == "caption"}
    assert all(i.meta["context"] == captions[i.image] for i in lb.items)


# ---------------------------------------------------------------------------------------------
# Report


def _metrics(chair_i: float, f1: float, mm: float, rel: float) -> dict:
    split = {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": f1, "yes_ratio": 0.5, "n": 10,
             "true_positives": 0, "false_positives": 0, "true_negatives": 0, "false_negatives": 0}
    return {"benchmarks": {
        "chair": {"chair_s": 2 * chair_i, "chair_i": chair_i, "recall": 0.5, "n_mentions": 300},
        "pope": {"random": split, "adversarial": {**split, "f1": f1 - 0.1},
                 "mean": {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": f1 - 0.05, "yes_ratio": 0.5},
                 "strict": {"random": {**split, "f1": f1 - 0.2},
                            "mean": {"accuracy": 0.4, "precision": 0.5, "recall": 0.5, "f1": f1 - 0.2, "yes_ratio": 0.4}}},
        "mmvet": {"total": mm, "per_capability": {"rec": mm, "spat": mm / 2}},
        "llava_bench": {"all": {"relative": rel}, "per_category": {"conv": {"relative": rel}}},
    }, "counts": {"chair": {"items": 3, "scored": 2, "failed": 1}}, "failures": {"chair": {"missing_image": 1}}}


def test_report_table_deltas_plots_and_json(tmp_path):
    from bpo_ray.evaluate import write_report

    results = {"bpo-both": _metrics(0.10, 0.80, 30.0, 70.0), "base": _metrics(0.25, 0.70, 25.0, 60.0)}
    written = write_report(results, str(tmp_path), config={"evaluate": {"max_items": 5}})
    markdown = (tmp_path / "report.md").read_text()
    # Baseline is "base" even when it is not first; deltas are against it, in percent points.
    assert "change against **base**" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| bpo-both |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in markdown.splitlines() if line.startswith("| Model | CHAIR_s"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    got = dict(zip(columns, cells))
    assert got["CHAIR_i (Obj) ↓"] == "10.0 (−15.0)"
    assert got["CHAIR_s (Resp) ↓"] == "20.0 (−30.0)"
    assert got["POPE F1"] == "75.0 (+10.0)" and got["POPE F1 adv."] == "70.0 (+10.0)"
    assert got["POPE F1 strict"] == "60.0 (+10.0)" and got["POPE acc strict"] == "40.0 (+0.0)"
    assert "| bpo-both | random | official | 50.0 | 50.0 | 50.0 | 80.0 | 50.0 | 10 |" in markdown
    assert "| bpo-both | random | strict | 50.0 | 50.0 | 50.0 | 60.0 | 50.0 | 10 |" in markdown
    assert got["MM-Vet"] == "30.0 (+5.0)" and got["LLaVA-Bench rel."] == "70.0 (+10.0)"
    base_row = next(line for line in markdown.splitlines() if line.startswith("| base |"))
    assert "(" not in base_row  # no delta against itself
    assert "| bpo-both | chair | 3 | 2 | 1 | missing_image: 1 |" in markdown
    # base: CHAIR_i 0.25 over 300 mentions -> sqrt(.25*.75/300) = 2.5 points; POPE acc 0.5 over 20 probes -> 11.2
    assert "standard error of **base**: CHAIR_i ±2.5 (300 object mentions), POPE acc ±11.2 (20 probes)" in markdown
    assert "| base | 25.0 | 12.5 | 25.0 |" in markdown  # MM-Vet by capability: rec, spat, total
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["baseline"] == "base" and report["config"] == {"evaluate": {"max_items": 5}}
    assert report["headline"]["bpo-both"]["CHAIR_i (Obj) ↓"] == pytest.approx(10.0)
    assert report["models"]["base"]["benchmarks"]["mmvet"]["total"] == 25.0
    for name in ("plots/headline.png", "plots/pope_f1.png", "plots/mmvet.png", "plots/llava_bench.png"):
        assert Path(written[name]).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in markdown


def test_report_to_s3_and_partial_benchmarks(s3_server):
    from bpo_ray import storage
    from bpo_ray.evaluate import write_report

    only_pope = {"base": {"benchmarks": {"pope": _metrics(0.1, 0.6, 0, 0)["benchmarks"]["pope"]}}}
    out = f"{s3_server['root']}/report-pope"
    written = write_report(only_pope, out)
    markdown = storage.read_text(written["report.md"])
    header = next(line for line in markdown.splitlines() if line.startswith("| Model |"))
    assert "POPE F1" in header and "CHAIR" not in header and "MM-Vet" not in header
    assert "## POPE by split" in markdown and "## MM-Vet" not in markdown and "## LLaVA" not in markdown
    assert set(written) == {"report.json", "report.md", "plots/headline.png", "plots/pope_f1.png"}
    with pytest.raises(ValueError, match="baseline"):
        write_report(only_pope, out, baseline="sft")


# ---------------------------------------------------------------------------------------------
# Per-item failures against real HTTP servers (no Ray)




def _scripted_app(replies: list):
    """Chat server answering with the next scripted reply: a string, or an int HTTP status."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI()
    app.state.bodies = []

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        app.state.bodies.append(body)
        reply = replies.pop(0)
        if isinstance(reply, int):
            raise HTTPException(reply, "scripted failure")
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

    return app


def test_items_fail_with_reasons_and_mmvet_falls_back_to_zero(tmp_path):
    from PIL import Image

    from bpo_ray.evaluate.judge import Secret, model_client
    from bpo_ray.evaluate.runner import EndpointSpec, ImageCache, answer_row, judge_row

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    row = {"id": "mmvet/1", "benchmark": "mmvet", "image": str(tmp_path / "red.png"), "question": "Colour?",
           "reference": "Red.", "category": "rec", "meta": "{}", "max_tokens": 8, "needs_judge": True}
    replies = ["Red.", 500, "no idea", "still no idea", "The grade: 0.9", "Both answers are fine."]
    app = _scripted_app(replies)
    with AppServer(app, suffix="/v1") as url:
        spec = EndpointSpec(url, "m", Secret(""), max_retries=0)
        client = model_client(url, Secret(""), 10, 0)
        images = ImageCache()
        answered = answer_row(client, spec, images, row)
        assert (answered["answer"], answered["error"]) == ("Red.", "")
        sent = app.state.bodies[0]["messages"][0]["content"]
        assert sent[0]["type"] == "image_url" and sent[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert sent[1] == {"type": "text", "text": "Colour?"} and app.state.bodies[0]["max_tokens"] == 8
        assert answer_row(client, spec, images, row)["error"] == "http_500"
        missing = answer_row(client, spec, images, {**row, "image": str(tmp_path / "gone.png")})
        assert missing["error"] == "missing_image" and len(app.state.bodies) == 2  # no request sent
        # Two unusable grades then no attempts left: MM-Vet's rule, 0.0, flagged.
        judged = judge_row(client, spec, mmvet.grader_protocol(attempts=2), answered)
        assert (judged["judge_value"], judged["judge_error"], judged["judge_attempts"]) == ("0.0", "unparsable", 2)
        assert app.state.bodies[-1]["messages"][0]["content"].endswith("(digit): ")
        assert [b["temperature"] for b in app.state.bodies[-2:]] == [0.0, 0.0]
        # LLaVA-Bench has no fallback: an unusable review leaves no value.
        judged = judge_row(client, spec, llava_bench.REVIEWER, {**answered, "meta": json.dumps({"context": "c"})})
        assert judged["judge_value"] == "" and judged["judge_error"] == "unparsable"
    closed = model_client(url, Secret(""), 2, 0)
    assert answer_row(closed, spec, images, row)["error"] == "connection_error"


def test_secret_never_prints():
    from bpo_ray.evaluate.judge import Secret

    token = Secret("sk-very-secret")
    assert "very-secret" not in repr(token) and "very-secret" not in str(token) and "very-secret" not in f"{token}"
    assert token.get() == "sk-very-secret" and not Secret(None)


def test_duplicate_item_ids_are_skipped_not_merged():
    from bpo_ray.evaluate.items import EvalItem, LoadedBenchmark
    from bpo_ray.evaluate.pipeline import drop_duplicate_ids

    bench = LoadedBenchmark("pope", [EvalItem("pope/random-1", "pope", "a.jpg", "Q1"),
                                     EvalItem("pope/random-1", "pope", "b.jpg", "Q2"),
                                     EvalItem("pope/random-2", "pope", "a.jpg", "Q3")])
    drop_duplicate_ids(bench)
    assert [i.question for i in bench.items] == ["Q1", "Q3"]
    assert bench.skipped == {"duplicate_id": 1} and "b.jpg" in bench.skipped_records[0]["raw"]


def test_official_judge_prompts_can_be_supplied_from_files(tmp_path):
    """Published-number comparability: the user's copy of a benchmark's own prompt replaces ours."""
    from bpo_ray.config import load_config
    from bpo_ray.evaluate.pipeline import judge_protocols

    grader = tmp_path / "mmvet_prompt.txt"
    grader.write_text("OFFICIAL GRADER TEXT\n")
    rule = tmp_path / "rule.txt"
    rule.write_text("OFFICIAL RULE TEXT")
    cfg = load_config("tiny", ["evaluate.benchmarks=[mmvet,llava_bench]",
                               f"evaluate.mmvet.grader_prompt_file={grader}",
                               f"evaluate.llava_bench.rule_prompt_file={rule}"])
    protocols = judge_protocols(cfg)
    row = {"question": "q", "reference": "r", "answer": "a", "meta": "{}"}
    mm = protocols["mmvet"].build(row, 0).messages[-1]["content"]
    assert mm.startswith("OFFICIAL GRADER TEXT\n\nq | r | a | ")
    lb = protocols["llava_bench"].build(row, 0).messages[-1]["content"]
    assert "[System]\nOFFICIAL RULE TEXT" in lb
    default = judge_protocols(load_config("tiny", ["evaluate.benchmarks=[mmvet]"]))["mmvet"].build(row, 0)
    assert "OFFICIAL" not in default.messages[-1]["content"]


def test_world_pope_probes_do_not_depend_on_where_the_world_lies(small_world, tmp_path):
    """Probes are drawn per image from a seed that names the image: the path inside the world,
    not the absolute one, or two runs with different output folders ask different questions."""
    import shutil

    from bpo_ray.config.evaluate import PopeSettings

    moved = tmp_path / "elsewhere" / "world"
    shutil.copytree(small_world, moved)
    asked = [(i.id, i.question, i.meta["label"], Path(i.image).relative_to(small_world))
             for i in pope.load_world(str(small_world), PopeSettings(n_per_image=1), None).items]
    again = [(i.id, i.question, i.meta["label"], Path(i.image).relative_to(moved))
             for i in pope.load_world(str(moved), PopeSettings(n_per_image=1), None).items]
    assert asked == again and len(asked) > 10
