"""Golden parity: bpo-ray's scorers against outputs of the official reference implementations.

The goldens in tests/fixtures/parity/ were produced by running the public reference code on inputs
written for this project (tests/fixtures/parity/README.md says how); these tests assert that
bpo-ray computes exactly what the reference computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bpo_ray.metrics.amber import score_discriminative, score_generative
from bpo_ray.metrics.chair import chair_report, score_caption
from bpo_ray.metrics.nltk_tokenize import word_tokenize
from bpo_ray.metrics.objhal import ObjHalExtractor, ObjHalReport, clean_answer, coco_objhal_truth, score_answer
from bpo_ray.metrics.pope import parse_pope_official, score_pope
from bpo_ray.metrics.rohrbach import RohrbachExtractor, pattern_singularize
from bpo_ray.metrics.wordnet import NounLemmatizer
from bpo_ray.evaluate.benchmarks import pope
from bpo_ray.evaluate.benchmarks.chair import coco_truth

PARITY = Path(__file__).parent / "fixtures" / "parity"


def _json(name: str) -> Any:
    return json.loads((PARITY / name).read_text())


@pytest.fixture(scope="module")
def rohrbach() -> RohrbachExtractor:
    return RohrbachExtractor((PARITY / "chair" / "synonyms.txt").read_text().splitlines(), mode="rohrbach")


def test_singularizer_matches_pattern_on_every_coco_form_and_its_plurals() -> None:
    golden: dict[str, str] = _json("pattern_singularize_golden.json")
    assert len(golden) > 3000
    ours = {word: pattern_singularize(word) for word in golden}
    assert ours == golden
    assert golden["bus"] == "bu" and golden["policemen"] == "policeman"  # the defect and the rule kept


def test_chair_matches_rohrbach_reference_caption_by_caption(rohrbach: RohrbachExtractor) -> None:
    golden = _json("chair_rohrbach_golden.json")
    generated = {row["image_id"]: row["caption"] for row in _json("chair/generated_captions.json")}
    _, truth = coco_truth(_json("chair/instances_val2014.json"), _json("chair/captions_val2014.json"), rohrbach)
    items = []
    for expected in golden["sentences"]:
        image_id = expected["image_id"]
        found = rohrbach.caption_words(generated[image_id])
        assert found.tokens == expected["words"], expected["caption"]
        assert found.objects == expected["mscoco_generated_words"], expected["caption"]
        assert sorted(truth[image_id]) == expected["mscoco_gt_words"], expected["caption"]
        item = score_caption(generated[image_id], truth[image_id], rohrbach)
        hallucinated = [[word, obj] for word, obj, pos in zip(found.words, found.objects, found.positions)
                        if obj not in truth[image_id]]
        assert hallucinated == expected["mscoco_hallucinated_words"], expected["caption"]
        assert [pos for obj, pos in zip(found.objects, found.positions)
                if obj not in truth[image_id]] == expected["hallucination_idxs"]
        assert (int(item.is_hallucinated), item.chair_i) == (expected["CHAIRs"], expected["CHAIRi"])
        items.append(item)
    report = chair_report(items)
    assert (report.chair_s, report.chair_i) == (golden["overall"]["CHAIRs"], golden["overall"]["CHAIRi"])


# ------------------------------------------------------------------------------------ POPE


def _pope_inputs(split: str) -> tuple[list[dict[str, Any]], list[str]]:
    labels = [json.loads(line) for line in (PARITY / "pope" / f"{split}_labels.jsonl").read_text().splitlines()]
    answers = [json.loads(line)["answer"] for line in (PARITY / "pope" / f"{split}_answers.jsonl").read_text().splitlines()]
    return [{"split": split, "label": row["label"]} for row in labels], answers


@pytest.mark.parametrize("split", ["random", "adversarial"])
def test_pope_official_parse_and_metrics_match_rucaibox_evaluate(split: str) -> None:
    golden = _json("pope_official_golden.json")[split]
    probes, answers = _pope_inputs(split)
    assert answers == golden["answers"]
    assert [parse_pope_official(a) for a in answers] == golden["predictions"]
    scores = score_pope(probes, answers)[split]  # the official parse is the default
    assert (scores.true_positives, scores.false_positives, scores.true_negatives, scores.false_negatives) == (
        golden["TP"], golden["FP"], golden["TN"], golden["FN"])
    assert (scores.accuracy, scores.precision, scores.recall, scores.f1, scores.yes_ratio) == (
        golden["accuracy"], golden["precision"], golden["recall"], golden["f1"], golden["yes_ratio"])


def test_pope_benchmark_reports_official_numbers_and_strict_beside_them() -> None:
    golden = _json("pope_official_golden.json")
    rows = []
    for split in ("random", "adversarial"):
        probes, answers = _pope_inputs(split)
        rows += [{"id": f"{split}-{i}", "answer": a, "meta": json.dumps(p)} for i, (p, a) in enumerate(zip(probes, answers))]
    metrics, details = pope.score(rows)
    assert metrics["parse"] == "official"
    for split in ("random", "adversarial"):
        assert metrics[split]["f1"] == golden[split]["f1"] and metrics[split]["accuracy"] == golden[split]["accuracy"]
        assert metrics["strict"][split]["f1"] != golden[split]["f1"]  # the strict parse reads these answers otherwise
    assert [d["prediction"] for d in details] == golden["random"]["predictions"] + golden["adversarial"]["predictions"]
    nope = next(d for d in details if d["id"] == "random-2")  # "Nope."
    assert (nope["prediction"], nope["prediction_strict"]) == ("yes", "no")


# ------------------------------------------------------------------------- Object HalBench


@pytest.fixture(scope="module")
def objhal_extractor() -> ObjHalExtractor:
    lemmatizer = NounLemmatizer.from_dir(str(PARITY / "objhal" / "wordnet"))
    return ObjHalExtractor((PARITY / "objhal" / "synonyms_refine.txt").read_text().splitlines(), lemmatizer)


def test_tokenizer_matches_nltk_381_word_tokenize_on_edge_cases() -> None:
    golden = _json("nltk_word_tokenize_golden.json")
    assert len(golden) > 30
    for text, tokens in golden:
        assert word_tokenize(text) == tokens, text


def test_wordnet_lemmatizer_matches_nltk_on_every_input_token() -> None:
    golden: dict[str, str] = _json("objhal_wordnet_lemmas_golden.json")
    lemmatizer = NounLemmatizer.from_dir(str(PARITY / "objhal" / "wordnet"))
    assert {token: lemmatizer.lemmatize(token) for token in golden} == golden
    assert (golden["buses"], golden["men"], golden["glasses"], golden["ties"]) == ("bus", "men", "glass", "tie")


def test_objhal_matches_rlaifv_reference_answer_by_answer(objhal_extractor: ObjHalExtractor) -> None:
    golden = _json("objhal_official_golden.json")
    answers = [json.loads(line) for line in (PARITY / "objhal" / "obj_halbench_answer.jsonl").read_text().splitlines()]
    instances, captions = _json("objhal/instances_val2014.json"), _json("objhal/captions_val2014.json")
    truth = coco_objhal_truth(instances, captions, objhal_extractor, [a["image_id"] for a in answers])
    assert len(golden["sentences"]) == len(answers)
    items = []
    for row, expected in zip(answers, golden["sentences"]):
        answer = clean_answer(row["text"])
        assert answer == expected["caption"]
        assert word_tokenize(answer.lower()) == expected["tokens"], answer
        found = objhal_extractor.caption_words(answer)
        assert found.tokens == expected["words"], answer
        assert [[w, o] for w, o in zip(found.words, found.objects)] == expected["mscoco_generated_words"], answer
        assert sorted(truth[row["image_id"]]) == expected["mscoco_gt_words"], answer
        item = score_answer(answer, truth[row["image_id"]], objhal_extractor)
        assert [node[-1] for _, node in expected["mscoco_hallucinated_words"]] == item.hallucinated, answer
        assert [p for o, p in zip(found.objects, found.positions) if o not in truth[row["image_id"]]] == expected["hallucination_idxs"]
        assert int(item.is_hallucinated) == expected["metrics"]["CHAIRs"]
        items.append(item)
    ours = ObjHalReport(items).summary()
    for key, value in golden["overall_metrics"].items():
        if key.startswith("all_gpt"):
            continue
        assert ours[key] == value, key
    assert ours["CHAIRs_refine"] > ours["CHAIRs"]  # answers naming no COCO object leave the denominator


# ------------------------------------------------------------------------------------ AMBER


def _amber_inputs() -> tuple[list[dict[str, Any]], dict[int, str]]:
    annotations = _json("amber/annotations.json")
    responses = {r["id"]: r["response"] for r in _json("amber/responses.json")}
    return annotations, responses


def test_amber_discriminative_matches_official_inference_py() -> None:
    printed = _json("amber_official_golden.json")["printed"]
    annotations, responses = _amber_inputs()
    ours = score_discriminative((a["type"], a["truth"], responses[a["id"]])
                                for a in annotations if a["type"] != "generative")
    names = {"all": "Descriminative Task", "existence": "Exsitence", "attribute": "Attribute", "state": "State",
             "number": "Number", "action": "Action", "relation": "Relation"}
    for key, section in names.items():
        assert ours[key] == printed[section], key


def test_amber_generative_with_the_golden_runs_similarity_matches_official() -> None:
    golden = _json("amber_official_golden.json")
    annotations, _ = _amber_inputs()
    nouns = _json("amber/nouns.json")
    table = {(a, b): s for a, b, s in _json("amber/similarity.json")}
    calls: list[list[str]] = []

    def similarity(a: str, b: str) -> float:
        calls.append([a, b])
        return table.get((a, b), 0.0)

    rows = [(nouns[str(a["id"])], a["truth"], a["hallu"]) for a in annotations if a["type"] == "generative"]
    safe = (PARITY / "amber" / "safe_words.txt").read_text().split("\n")
    report = score_generative(rows, _json("amber/relation.json"), safe, similarity, threshold=0.8)
    assert report.printed() == golden["printed"]["Generative Task"]
    assert calls == golden["similarity_calls"]  # the same comparisons, in the same order
