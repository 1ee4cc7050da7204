"""Seed 002's text benchmarks: the MT-Bench question-file loader and scorer, AlpacaEval's reference
loader and win rate on hand-checked examples, the world annotator's MT-Bench / AlpacaEval grades,
and one run through a served model, the judge proxy and the world annotator with ``openai``.
"""

from __future__ import annotations

import json

import pytest

from bpo_ray.evaluate.benchmarks import alpaca_eval, mtbench
from bpo_ray.world import annotator
from test_world_judge import small_world  # noqa: F401  (fixture)

SCENE = "There is a blue pen in the center. There are two red cups, at the top and on the left."
Q = mtbench.Question("7", "count", (f"{SCENE} Is there a pen in the image?", "How many cups are there?"),
                     ("The pen yes.", "Two."))


def test_question_file_loader_counts_bad_lines(tmp_path, s3_server):
    from bpo_ray import storage

    lines = [json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}),
             json.dumps({"question_id": 111, "category": "math", "turns": ["2+2?", "Times 3?"],
                         "reference": ["4", "12"]}),
             "{not json", json.dumps([1, 2]), json.dumps({"category": "x", "turns": ["a"]}),
             json.dumps({"question_id": 5, "turns": []}), json.dumps({"question_id": 6, "turns": ["a", "b", "c"]}),
             json.dumps({"question_id": 7, "turns": ["a", "b"], "reference": ["only one"]}),
             json.dumps({"question_id": 81, "turns": ["dup"]}), "",
             json.dumps({"question_id": "w1", "turns": ["Single turn only."]})]
    text = "\n".join(lines) + "\n"
    local = tmp_path / "question.jsonl"
    local.write_text(text)
    remote = f"{s3_server['root']}/mtbench/question.jsonl"
    for uri in filter(None, (str(local), remote)):
        if uri.startswith("s3://"):
            storage.write_text(uri, text)
        loaded = mtbench.load_questions(uri)
        assert [q.question_id for q in loaded.questions] == ["81", "111", "w1"]
        assert loaded.questions[1].reference == ("4", "12") and loaded.questions[0].category == "writing"
        assert loaded.skipped == {"malformed_json": 1, "not_an_object": 1, "missing_question_id": 1, "bad_turns": 2,
                                  "bad_reference": 1, "duplicate_question_id": 1}
    assert len(mtbench.load_questions(str(local), max_items=2).questions) == 2
    with pytest.raises(mtbench.QuestionFileError):
        mtbench.load_questions(str(tmp_path / "absent.jsonl"))


def test_rating_parser_and_score_hand_checked():
    assert mtbench.parse_rating("Good answer. Rating: [[8]]") == 8
    assert mtbench.parse_rating("Rating: [[7.5]] and later [[2]]") == 7.5  # the first, as FastChat reads it
    assert mtbench.parse_rating("Rating: [6]") == 6
    assert mtbench.parse_rating("Rating: [[11]]") is None and mtbench.parse_rating("eight") is None
    m = mtbench.score([[8, 6], [10, None], [2, 4]], ["writing", "math", "writing"])
    # graded turns: 8, 6, 10, 2, 4 -> 30/5; turn 1: (8+10+2)/3, turn 2: (6+4)/2
    assert m["score"] == 6.0 and m["per_turn"] == {"turn1": 20 / 3, "turn2": 5.0}
    assert m["per_category"] == {"math": 10.0, "writing": 5.0} and m["n_unparsed"] == 1 and m["n_turns_graded"] == 5


def test_judge_prompts_show_reference_and_conversation():
    first = mtbench.judge_prompt(Q, ["The pen yes.", "Three."], 0)
    assert "[Question]\n" + Q.turns[0] in first and "[The Start of Reference Answer]\nThe pen yes." in first
    assert "Three." not in first and "[[rating]]" in first
    second = mtbench.judge_prompt(Q, ["The pen yes.", "Three."], 1)
    assert "### User:\nHow many cups are there?\n\n### Assistant A:\nThree." in second
    assert "[The Start of Reference Answer]\nTwo." in second
    plain = mtbench.judge_prompt(mtbench.Question("1", "x", ("Hi?", "Bye?")), ["a", "b"], 0)
    assert "Reference" not in plain


@pytest.mark.parametrize("answers,expected", [
    (("The pen yes.", "Two."), (10, 10)),
    (("The pen no.", "Three."), (1, 1)),              # wrong decision; wrong count (a false claim)
    (("The pen yes.", "Two cups and a dog."), (10, 3)),  # names an absent dog: at most 3
    (("The pen yes.", "Two. Two."), (10, 8)),           # repeated sentence: coherence 1, minus 2
])
def test_world_annotator_grades_mtbench_turns(answers, expected):
    got = []
    for turn in (0, 1):
        reply = annotator.answer_prompt(mtbench.judge_prompt(Q, list(answers), turn))
        assert reply.protocol == "mtbench"
        got.append(mtbench.parse_rating(reply.text))
    assert tuple(got) == expected


def test_world_questions_are_deterministic_and_graded_10_with_their_references():
    a, b = mtbench.world_questions(12, seed=3), mtbench.world_questions(12, seed=3)
    assert a == b and a != mtbench.world_questions(12, seed=4)
    for record in a:
        q = mtbench.parse_question(record)
        for turn in (0, 1):
            assert mtbench.parse_rating(annotator.answer_prompt(mtbench.judge_prompt(q, list(q.reference), turn)).text) == 10


def test_alpaca_reference_loader_and_win_rate(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi.", "generator": "base"},
                                {"instruction": "", "output": "x"}, "nope", {"instruction": "Q?"},
                                {"instruction": "Q2?", "output": ""}]))
    loaded = alpaca_eval.load_reference(str(path))
    assert [(i.index, i.instruction, i.generator) for i in loaded.items] == [(0, "Say hi.", "base"), (4, "Q2?", "")]
    assert loaded.skipped == {"missing_instruction": 1, "not_an_object": 1, "missing_output": 1}
    orders = [alpaca_eval.model_first(0, i) for i in range(200)]
    assert orders == [alpaca_eval.model_first(0, i) for i in range(200)] and 70 < sum(orders) < 130
    assert alpaca_eval.parse_verdict("I prefer Output (b).") == "b" and alpaca_eval.parse_verdict("Tie") == "tie"
    assert alpaca_eval.parse_verdict("both fine") is None
    assert alpaca_eval.model_preference("a", first=True) == 1.0 and alpaca_eval.model_preference("a", first=False) == 0.0
    m = alpaca_eval.score([1.0, 0.0, 0.5, None, 1.0])
    assert m["win_rate"] == 62.5 and (m["wins"], m["ties"], m["losses"], m["n_unparsed"]) == (2, 1, 1, 1)


def test_world_annotator_picks_the_better_output_in_either_order():
    instr = Q.turns[0]
    for first in (True, False):
        reply = annotator.answer_prompt(alpaca_eval.judge_prompt(instr, "The pen yes.", "The pen no.", first))
        assert reply.protocol == "alpaca_eval"
        assert alpaca_eval.model_preference(alpaca_eval.parse_verdict(reply.text), first) == 1.0
    tie = annotator.answer_prompt(alpaca_eval.judge_prompt(instr, "The pen yes.", "The pen yes.", True)).text
    assert alpaca_eval.parse_verdict(tie) == "tie"


# ---------------------------------------------------------------------------------------------
# Through the served model and the judge proxy (official openai client), the world annotator upstream


@pytest.mark.slow
def test_text_benchmarks_through_served_model_and_judge_proxy(tiny_models, small_world, tmp_path, monkeypatch):
    from bpo_ray.config import load_config
    from bpo_ray.config.serve import JudgeProxyConfig
    from bpo_ray.evaluate.judge import Secret
    from bpo_ray.evaluate.text_bench import Endpoints, answer_instructions, run_alpaca_eval, run_mtbench
    from bpo_ray.serving.judge.proxy import create_judge_app
    from bpo_ray.serving.standalone import create_standalone_app
    from bpo_ray.world.judge_server import SceneIndex, create_app
    from tests.serve_support import AppServer as Server

    monkeypatch.setenv("BPO_TEST_TB_TOKENS", "bench:tok-text-bench-1")
    cfg = load_config("tiny", [f"models.mllm={tiny_models['mllm']}", "models.device=cpu",
                               "serve.model.max_tokens=32", "serve.model.max_prompt_tokens=400"])
    questions = [mtbench.parse_question(r) for r in mtbench.world_questions(3, seed=1)]
    with Server(create_app(SceneIndex(str(small_world)))) as annotator_url, \
            Server(create_standalone_app(cfg)) as model_url:
        proxy_cfg = JudgeProxyConfig(upstream_base_url=f"{annotator_url}/v1", upstream_key_env="BPO_TEST_TB_NO_KEY",
                                     client_tokens_env="BPO_TEST_TB_TOKENS", cache_path=str(tmp_path / "c.sqlite"))
        with Server(create_judge_app(proxy_cfg, prefix="/judge/v1")) as proxy_url:
            ep = Endpoints(f"{model_url}/v1", "base", f"{proxy_url}/judge/v1", Secret("tok-text-bench-1"),
                           max_tokens=12)
            for mode in ("none", "random"):
                metrics, details = run_mtbench(questions, ep, image_mode=mode, seed=1, workers=2)
                assert metrics["n_errors"] == 0 and metrics["n_turns_graded"] == 6 and metrics["n_unparsed"] == 0
                assert all(1 <= r <= 10 for d in details for r in d["ratings"]) and metrics["image_mode"] == mode
                # each rating is what the annotator gives the model's own answers
                for q, d in zip(questions, details):
                    for t in (0, 1):
                        text = annotator.answer_prompt(mtbench.judge_prompt(q, d["answers"], t)).text
                        assert mtbench.parse_rating(text) == d["ratings"][t]
            # AlpacaEval against the model's own outputs: identical greedy outputs, every verdict a tie
            ref = tmp_path / "ref.json"
            answer_instructions([q.turns[0] for q in questions], ep, "base", str(ref))
            items = alpaca_eval.load_reference(str(ref)).items
            metrics, _ = run_alpaca_eval(items, ep, seed=1, workers=2)
            assert metrics["n_judged"] == 3 and metrics["ties"] == 3 and metrics["win_rate"] == 50.0
            # a judge token the proxy does not know: every item is an error, counted, none scored
            bad = Endpoints(f"{model_url}/v1", "base", f"{proxy_url}/judge/v1", Secret("wrong"), max_retries=0,
                            max_tokens=12)
            metrics, details = run_mtbench(questions[:1], bad, workers=1)
            assert metrics["n_errors"] == 1 and metrics["n_turns_graded"] == 0 and details[0]["error"] == "http_401"
