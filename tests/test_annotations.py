"""Seed 002's annotation dataset: five-attribute judge replies, the world annotator's five ratings,
annotation rows through outcomes and shards, and the training sets derived from them.

Fast unit tests (no Ray); the generate job end to end is in test_annotations_pipeline.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from bpo_ray.config.generate import FilterConfig
from bpo_ray.generate import annotations as ann
from bpo_ray.generate.judge_ranked import ATTRIBUTES, JudgeClient, JudgeError, choose_pair, judge_messages, parse_scores
from bpo_ray.generate.pairs import item_outcome
from bpo_ray.models.steerlm import steer_prompt
from bpo_ray.generate.shards import ShardStore, total_counts
from bpo_ray.schemas import ANNOTATION_SCHEMA, PAIR_SCHEMA, SchemaError, annotations_table, read_parquet
from bpo_ray.world import annotator, grading
from test_generate_units import JudgeServer

FIVE = '{"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 2, "verbosity": 1}'


def test_parse_five_attributes_with_reasoning():
    reply = ('Response 1 names the cup. Response 2 is empty.\n{"scores": [{"reasoning": "names the cup", '
             '"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 2, "verbosity": 1}, '
             '{"helpfulness": 0, "correctness": 0, "coherence": 0, "complexity": 0, "verbosity": 0}]}')
    first, second = parse_scores(reply, 2, ATTRIBUTES)
    assert first.ratings() == {"helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 2, "verbosity": 1}
    assert first.total == 11 and first.reasoning == "names the cup"
    # no per-entry reasoning: the monologue before the JSON stands in for it
    assert second.reasoning == "Response 1 names the cup. Response 2 is empty."
    three = '{"scores": [{"helpfulness": 4, "correctness": 3, "coherence": 4}]}'
    assert parse_scores(three, 1)[0].complexity is None  # the three-metric reply still parses for 3
    with pytest.raises(JudgeError, match="complexity=None"):
        parse_scores(three, 1, ATTRIBUTES)
    with pytest.raises(JudgeError, match="verbosity=5"):
        parse_scores(FIVE.replace('"verbosity": 1', '"verbosity": 5').join(['{"scores": [', ']}']), 1, ATTRIBUTES)
    with pytest.raises(ValueError, match="attributes"):
        parse_scores(three, 1, ("helpfulness", "tone"))


def test_prompt_asks_for_five_attributes_step_by_step():
    text = judge_messages("Q?", "R.", ["a", "b"])[1]["content"]
    for a in ATTRIBUTES:
        assert f"- {a}:" in text and f'"{a}": 0' in text
    assert "Think step by step" in text and '"reasoning"' in text and "(2 objects)" in text


def test_choose_pair_any_other_is_the_literal_rule():
    # any_other: the rejected one is drawn among all others, the pair kept only with the gap
    picks = [choose_pair([9, 8, 2, 1], 2.0, seed=s, draw="any_other") for s in range(40)]
    assert {p for p in picks if p} == {(0, 2), (0, 3)} and None in picks  # drawing 1 (gap 1) drops the item
    assert all(choose_pair([9, 8, 2, 1], 2.0, seed=s)[1] in (2, 3) for s in range(40))
    with pytest.raises(ValueError, match="draw"):
        choose_pair([1, 2], 1, 0, draw="worst")


def test_judge_client_asks_again_after_an_unusable_reply(monkeypatch):
    monkeypatch.setenv("BPO_TEST_ANNOTATION_TOKEN", "client-token")
    server = JudgeServer(mode="flaky")  # the first reply to each prompt is garbage
    try:
        client = JudgeClient(server.url, "judge", token_env="BPO_TEST_ANNOTATION_TOKEN", max_retries=0)
        scores, retries = client.score_with_retries("Is there a cup?", "Yes.", ["Yes there is.", "no"],
                                                    attributes=ATTRIBUTES, parse_retries=1)
        assert retries == 1 and server.calls == 2 and all(s.verbosity is not None for s in scores)
        with pytest.raises(JudgeError) as info:
            client.score_with_retries("Is there a dog?", "No.", ["x", "y"], attributes=ATTRIBUTES, parse_retries=0)
        assert info.value.reason == "judge_unparsable" and server.calls == 3
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# The world annotator's five attributes


CTX = "There is a red cup on the left. There are two blue dogs, at the top and on the right."


def test_complexity_and_verbosity_rules_hand_checked():
    ref = "There is a red cup on the left."  # 8 words
    assert [grading.complexity(a) for a in ("", "Yes.", "There is a cup.", ref, CTX, "A cup. A dog.")] == [0, 1, 2, 3, 4, 3]
    # verbosity: words / 8 -> <0.5: 1, <=1.5: 2, <=3: 3, >3: 4
    assert [grading.verbosity(a, ref) for a in ("", "Yes.", ref, CTX, " ".join([CTX] * 2))] == [0, 1, 2, 3, 4]


def test_world_annotator_rates_five_attributes_with_reasons():
    responses = [CTX, "There is a red cup on the left. There is a red cup on the left.", "Yes."]
    text = judge_messages("Describe the image in detail.", CTX, responses)[1]["content"]
    reply = annotator.answer_prompt(text)
    assert reply.protocol == "helpsteer"
    scores = parse_scores(reply.text, 3, ATTRIBUTES)
    got = [tuple(int(v) for v in s.ratings().values()) for s in scores]
    # CTX: all facts, well formed, caption-level, same length as the reference (20 words);
    # the repeated sentence: half the kinds, repetition, modifiers in 2 sentences, 16/20 words;
    # "Yes.": nothing asked for, one word, outside the caption grammar for a description (coherence 2)
    assert got == [(4, 4, 4, 4, 2), (2, 2, 1, 4, 2), (0, 0, 2, 1, 1)]
    assert "leaves out dog" in scores[1].reasoning and "16 words against the reference's 20" in scores[1].reasoning
    # the three-attribute prompt still gets the three-attribute reply it always got
    old = text.replace("- complexity:", "- cx:")
    assert set(json.loads(annotator.answer_prompt(old).text.splitlines()[-1])["scores"][0]) == \
        {"helpfulness", "correctness", "coherence"}


# ---------------------------------------------------------------------------------------------
# Rows, shards, derived training sets


def _item(i: int, status: str = "ok") -> dict:
    return {"item_id": f"r{i}#0", "source": "world", "image_uri": f"/img/{i}.png", "image_sha256": "ab" * 32,
            "llava_prompt": "USER: <image>\nDescribe the image. ASSISTANT:", "question": "Describe the image.",
            "answer": CTX, "status": status, "reason": "missing_id" if status != "ok" else None,
            "stage": "read" if status != "ok" else None, "raw": "{}"}


def _negative(totals: list[tuple[int, int, int]], pick: tuple[int, int] | None) -> dict:
    texts = [f"There is a red cup number {k} on the left." for k in range(len(totals))]
    prov = {"backend": "transformers", "temperature": 0.7, "judge_model": "j"}
    annotations = [{"completion_index": k, "completion": texts[k], "helpfulness": h, "correctness": c,
                    "coherence": o, "complexity": 2, "verbosity": 2, "reasoning": f"why {k}", "seed": 100 + k}
                   for k, (h, c, o) in enumerate(totals)]
    neg = {"annotations": annotations, "judge_model": "j", "generator": "m", "annotation_sampling": prov,
           "judge_retries": 1}
    if pick is None:
        return {"filtered": "no_score_gap", **neg}
    sums = [float(sum(t)) for t in totals]
    return {"chosen": texts[pick[0]], "text": texts[pick[1]], "noise_step": None, "seed": 100 + pick[1],
            "sampling": {**prov, "chosen_score": sums[pick[0]], "rejected_score": sums[pick[1]], "scores": sums}, **neg}


def _outcome(i: int, totals, seed: int = 0):
    from bpo_ray.generate.seeds import derive_seed

    pick = choose_pair([float(sum(t)) for t in totals], 2.0, derive_seed(seed, "pick", f"r{i}#0"))
    item = {**_item(i), "neg_judge_ranked": json.dumps([_negative(totals, pick)])}
    return {**item_outcome(item, ["judge_ranked"], FilterConfig()), "order": i}


TOTALS = {0: [(4, 4, 4), (1, 1, 1), (4, 3, 4), (2, 2, 2)],   # paired
          1: [(3, 3, 3), (3, 3, 2), (3, 2, 3), (3, 3, 3)],   # no gap: filtered, annotations kept
          2: [(0, 0, 0), (4, 4, 4), (1, 0, 0), (4, 4, 3)]}


def test_annotations_flow_through_outcomes_and_shards(tmp_path):
    results = [_outcome(i, t) for i, t in TOTALS.items()]
    quarantined = {**item_outcome(_item(3, "bad"), ["judge_ranked"], FilterConfig()), "order": 3}
    assert [r["outcome"] for r in results] == ["paired", "filtered", "paired"]
    assert all(len(r["annotations"]) == 4 for r in results) and quarantined["annotations"] == []
    assert results[0]["reasons"].count("judge.retry") == 1
    store = ShardStore(str(tmp_path / "out"))
    marker = store.commit(0, results + [quarantined])
    assert marker["annotations_written"] == 12 and marker["pairs_written"] == 2
    table = read_parquet(store.uri("annotations"), ANNOTATION_SCHEMA)
    assert table.num_rows == 12 and len(set(table.column("id").to_pylist())) == 12
    row = table.to_pylist()[0]
    assert row["reference"] == CTX and row["question"] == "Describe the image." and row["reasoning"] == "why 0"
    counts = total_counts(store.markers(), expected_items=4)
    assert counts.annotations_written == 12 and counts.by_reason["judge.retry"] == 3
    # the pairs derived from the stored annotations are the pairs the job wrote, byte for byte
    written = read_parquet(store.uri("pairs"), PAIR_SCHEMA)
    derived = ann.dpo_pairs(table, 2.0, seed=0, filters=FilterConfig())
    assert derived.to_pylist() == written.to_pylist()


def test_annotation_ratings_outside_the_scale_are_refused():
    row = {f.name: 0 for f in ANNOTATION_SCHEMA} | {k: "x" for k in ("id", "source", "source_id", "image",
                                                                     "image_sha256", "prompt", "question",
                                                                     "reference", "completion", "reasoning",
                                                                     "judge_model", "generator", "sampling")}
    assert annotations_table([row]).num_rows == 1
    with pytest.raises(SchemaError, match="verbosity values outside 0-4"):
        annotations_table([{**row, "verbosity": 7}])
    with pytest.raises(SchemaError, match="'reasoning' has 1 nulls"):
        annotations_table([dict(row, reasoning=None)])


def _annotation_table() -> pa.Table:
    return pa.Table.from_pylist([a for i, t in TOTALS.items() for a in _outcome(i, t)["annotations"]],
                                schema=ANNOTATION_SCHEMA)


def test_rejection_sampling_takes_each_items_top_completion():
    table = ann.rejection_sampling_rows(_annotation_table())
    rows = table.to_pylist()
    # item 0: (4,4,4) at 0; item 1: ties at 9 -> the first; item 2: (4,4,4) at 1
    assert [r["chosen"] for r in rows] == ["There is a red cup number 0 on the left.",
                                           "There is a red cup number 0 on the left.",
                                           "There is a red cup number 1 on the left."]
    assert all(r["strategy"] == "rejection_sampling" and r["prompt"].endswith("ASSISTANT:")
               and "Attributes" not in r["prompt"] for r in rows)
    assert [json.loads(r["sampling"])["score"] for r in rows] == [12, 9, 12]
    assert ann.rejection_sampling_rows(_annotation_table(), min_total=10).num_rows == 2


def test_steerlm_rows_write_each_completions_ratings_into_the_prompt():
    table = ann.steerlm_rows(_annotation_table())
    assert table.num_rows == 12
    first = table.to_pylist()[0]
    assert first["prompt"] == ("USER: <image>\nDescribe the image.\nAttributes: helpfulness:4,correctness:4,"
                               "coherence:4,complexity:2,verbosity:2 ASSISTANT:")
    assert len(set(table.column("id").to_pylist())) == 12
    with pytest.raises(ValueError, match="missing"):
        steer_prompt("USER: q ASSISTANT:", {"helpfulness": 4})
    with pytest.raises(ValueError, match="integer in 0-4"):
        steer_prompt("USER: q ASSISTANT:", dict.fromkeys(ATTRIBUTES, 4.5))
    with pytest.raises(ValueError, match="ASSISTANT"):
        steer_prompt("USER: q", dict.fromkeys(ATTRIBUTES, 4))


def test_subsample_is_nested_and_seeded():
    table = ann.steerlm_rows(_annotation_table())
    quarter, half = (set(ann.subsample(table, f, seed=3).column("id").to_pylist()) for f in (0.25, 0.5))
    assert len(quarter) == 3 and len(half) == 6 and quarter < half
    assert ann.subsample(table, 0.5, seed=3).equals(ann.subsample(table, 0.5, seed=3))
    assert set(ann.subsample(table, 0.5, seed=4).column("id").to_pylist()) != half
    with pytest.raises(ValueError):
        ann.subsample(table, 0, seed=0)


def test_derive_cli_writes_sets_with_accounting_and_refuses_bad_input(tmp_path, capsys):
    import pyarrow.parquet as pq

    from bpo_ray.generate.derive import main
    from bpo_ray.schemas import read_manifest

    src = tmp_path / "gen" / "annotations"
    src.mkdir(parents=True)
    pq.write_table(_annotation_table(), src / "shard-00000.parquet")
    assert main(["--annotations", str(tmp_path / "gen"), "--method", "rejection_sampling", "--out", str(tmp_path / "rs")]) == 0
    m = read_manifest(str(tmp_path / "rs" / "manifest.json"))
    assert (m.counts.items_in, m.counts.paired, m.counts.filtered, m.counts.pairs_written) == (3, 3, 0, 3)
    assert main(["--annotations", str(src), "--method", "dpo", "--min-gap", "2", "--out", str(tmp_path / "dpo")]) == 0
    m = read_manifest(str(tmp_path / "dpo" / "manifest.json"))
    assert (m.counts.paired, m.counts.filtered) == (2, 1)  # item 1 has no 2-point gap
    assert read_parquet(str(tmp_path / "dpo" / "pairs"), PAIR_SCHEMA).num_rows == 2
    capsys.readouterr()
    assert main(["--annotations", str(tmp_path / "none"), "--method", "steerlm", "--out", str(tmp_path / "x")]) == 2
    assert "no annotations at" in capsys.readouterr().err
    assert main(["--annotations", str(src), "--method", "dpo", "--fraction", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["--annotations", str(src), "--method", "judge_answer", "--out", str(tmp_path / "x")]) == 2
    assert "needs --judge-url" in capsys.readouterr().err
