"""The world's annotator and MMHal-Bench (fast: no Ray).

* Grading rules on hand-checked prompts, built with the project's own prompt builders (MM-Vet,
  LLaVA-Bench, MMHal-Bench, the judge_ranked HelpSteer prompt, claim verification), so a change of
  a prompt's layout that the annotator no longer reads fails here.
* MMHal-Bench: the official rating parse, the template filling, the loaders (public
  ``response_template.json`` from a local path and from S3, and the bias world), the scorer.
* The annotator as a real HTTP server on loopback behind the real judge proxy, called with the
  official ``openai`` client: grades, claim verification from a world image, refusals, the
  proxy's cache and usage counters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bpo_ray.evaluate.benchmarks import llava_bench, mmhal, mmvet
from bpo_ray.world import annotator, grading
from tests.serve_support import AppServer

CTX = "There is a red cup on the left. There are two blue dogs, at the top and on the right."


def ask(text: str, scene=None) -> str:
    return annotator.answer_prompt(text, (lambda: scene) if scene is not None else None).text


def mmhal_prompt(contents, question, reference, answer, template=None) -> str:
    return mmhal.fill_template(template or mmhal.JUDGE_PROMPT, ", ".join(contents), question, reference, answer)


# ---------------------------------------------------------------------------------------------
# Grading rules on hand-checked prompts


@pytest.mark.parametrize("question,reference,answer,grade", [
    ("What colour is the cup?", "Red.", "The cup is red.", "1.0"),
    ("What colour is the cup?", "Red.", "Blue.", "0.0"),
    ("What colour is the cup?", "Red.", "It is red or blue.", "0.5"),
    ("How many dogs are there?", "Two.", "There are 2 dogs.", "1.0"),
    ("How many dogs are there?", "Two.", "Three.", "0.0"),
    ("Is there a saucer in the image?", "The saucer no.", "The saucer no.", "1.0"),
    ("Is there a saucer in the image?", "The saucer no.", "The saucer yes.", "0.0"),
    ("Where are the dogs?", "At the top and on the right.", "At the top.", "0.5"),
    ("Where are the dogs?", "At the top and on the right.", "At the top left and on the right.", "0.3"),
    # description: Jaccard of kinds, {cup, dog} vs {cup, saucer} -> 1/3
    ("Describe the image in detail.", CTX, "There is a red cup on the left. There is a blue saucer at the top.", "0.3"),
    ("Describe the image in detail.", CTX, "A red mug and two blue puppies.", "1.0"),  # synonyms count
    ("What objects are in the image?", "A red cup and two blue dogs.", "A cup, no dog.", "0.5"),  # negation
])
def test_mmvet_grades(question, reference, answer, grade):
    assert ask(mmvet.grader_query(question, reference, answer)) == grade
    # the re-ask suffix and MM-Vet's official layout (<AND> padded) are read the same way
    assert ask(mmvet.grader_query(question, reference, answer, attempt=2)) == grade


def test_llava_bench_rates_both_answers_from_the_context_scene():
    reply = ask(llava_bench.review_content(CTX, "How many dogs are there?", "Two.", "Three."))
    assert llava_bench.parse_score_pair(reply) == [10.0, 1.0]
    # the candidate is graded against the scene, not against Assistant 1: a wrong reference loses
    reply = ask(llava_bench.review_content(CTX, "What colour is the cup?", "Blue.", "Red."))
    assert llava_bench.parse_score_pair(reply) == [1.0, 10.0]
    # description: {cup, dog} truth, answer {cup, saucer}: 1 + 9/3 = 4
    reply = ask(llava_bench.review_content(CTX, "Describe the image in detail.", CTX,
                                           "There is a red cup on the left. There is a blue saucer at the top."))
    assert llava_bench.parse_score_pair(reply) == [10.0, 4.0]
    assert "saucer" in reply.splitlines()[1]  # the reason names the hallucinated object


@pytest.mark.parametrize("contents,question,reference,answer,rating", [
    (["cup", "dog"], "What colour is the cup?", "Red.", "Red.", 6),
    (["cup", "dog"], "What colour is the cup?", "Red.", "I cannot tell.", 3),
    (["cup", "dog"], "What colour is the cup?", "Red.", "Blue.", 0),
    (["cup", "dog"], "What colour is the cup?", "Red.", "The cup is red, next to a saucer.", 2),
    (["cup", "lock"], "Is there a saucer in the image?", "The saucer no.", "The saucer no.", 6),
    (["cup", "lock"], "Is there a saucer in the image?", "The saucer no.", "The saucer yes.", 0),
    (["cup", "dog"], "Describe the image in detail.", CTX, "There is a red cup on the left.", 5),
    (["cup", "dog", "key"], "What objects are in the image?", "A cup, two dogs and a key.", "A dog.", 4),
    (["cup", "dog"], "Describe the image in detail.", CTX, "There is a red cup and a blue saucer.", 2),
    (["cup", "dog", "key"], "What objects are in the image?", "A cup, two dogs and a key.", "A dog and a pen.", 1),
])
def test_mmhal_ratings_follow_the_rubric(contents, question, reference, answer, rating):
    reply = ask(mmhal_prompt(contents, question, reference, answer))
    assert mmhal.parse_rating(reply) == rating
    assert ("contains hallucination" in reply) == (rating < 3)


def test_mmhal_official_layout_is_read_too():
    """A user-supplied template with the official section headers (the official text is not
    shipped here; any wording around the four sections works)."""
    template = ("Rate it.\n\n### Image Contents\n{}\n\n### Question\n{}\n\n### Standard Human-Generated Answer\n{}"
                "\n\n### LMM Response to Evaluate\n{}\n")
    reply = ask(mmhal_prompt(["cup"], "Is there a dog in the image?", "The dog no.", "The dog yes.", template))
    assert mmhal.parse_rating(reply) == 0


def test_helpsteer_scores_from_reference_and_from_scene():
    from bpo_ray.generate.judge_ranked import judge_messages, parse_scores

    responses = ["There is a red cup on the left. There are two blue dogs, at the top and on the right.",
                 "There is a red cup on the left. There is a red cup on the left.",
                 "There is a red cup on the left and a saucer."]
    messages = judge_messages("Describe the image in detail.", CTX, responses)
    scores = parse_scores(ask(messages[1]["content"]), 3)
    assert [(s.helpfulness, s.correctness, s.coherence) for s in scores] == [(4, 4, 4), (2, 2, 1), (2, 1, 2)]  # Jaccard 1/3 -> 1
    # with the image, the scene (not the reference text) is the truth: here the scene has a saucer too
    scene = {"cup": ("red", ("left",)), "saucer": ("blue", ("top",))}
    text = judge_messages("Describe the image in detail.", CTX, responses[2:], "data:image/png;base64,")[1]["content"][1]["text"]
    [s] = parse_scores(ask(text, scene), 1)
    assert (s.helpfulness, s.correctness) == (4, 4)


def test_claim_verification_answers_from_the_scene():
    scene = {"cup": ("red", ("left",)), "dog": ("blue", ("top", "right"))}
    claim = annotator.CLAIM_TEMPLATE
    assert claim == "Is there {article} {obj} in the image? Answer yes or no."
    assert ask(claim.format(article="a", obj="cup"), scene) == "Yes."
    assert ask(claim.format(article="a", obj="puppy"), scene) == "Yes."  # a synonym of dog
    assert ask(claim.format(article="a", obj="saucer"), scene) == "No."
    assert ask(claim.format(article="an", obj="elephant"), scene) == "No."  # outside the world: not there
    with pytest.raises(annotator.UnknownPrompt, match="image"):
        ask(claim.format(article="a", obj="cup"))


def test_chair_object_lists():
    from bpo_ray.evaluate.benchmarks import chair

    def listed(description):
        return chair.parse_object_list(ask(chair.object_list_request({"answer": description}, 0).messages[0]["content"]))

    assert listed("There is a red mug on the left. The saucer no. There are two dogs.") == ["cup", "dog"]
    assert listed("Nothing to see.") == []


def test_unknown_prompts_are_refused():
    with pytest.raises(annotator.UnknownPrompt):
        ask("Write a poem about cups.")


def test_grading_helpers():
    assert grading.kinds_in("The saucer no. There is no dog, but a mug.") == {"cup"}
    assert grading.positions_in("at the top left and on the right") == {"top left", "right"}
    assert grading.scene_from_caption(CTX) == {"cup": ("red", ("left",)), "dog": ("blue", ("top", "right"))}
    assert grading.scene_from_caption("not a caption") is None
    assert grading.coherence("", "description") == 0
    assert grading.coherence("Red.", "colour") == 4


# ---------------------------------------------------------------------------------------------
# MMHal-Bench: parse, template, loaders, scorer


@pytest.mark.parametrize("reply,rating", [
    ("Explanation...\nRating: 4", 4),
    ("RATING: 0, not informative", 0),
    ("rating: 2 ... on reflection, rating: 5", None),   # several: the official summary counts 0
    ("Score 5", None),
    ("", None),
])
def test_mmhal_official_parse(reply, rating):
    assert mmhal.parse_rating(reply) == rating


def test_mmhal_template_placeholders():
    assert mmhal.fill_template("{}|{}|{}|{}", "a", "b {x}", "c", "d") == "a|b {x}|c|d"
    with pytest.raises(ValueError, match="four"):
        mmhal.judge_protocol("only {} and {}")
    request = mmhal.judge_request({"question": "Q?", "reference": "R.", "answer": "A.",
                                   "meta": json.dumps({"image_content": ["Cat", "Lynx"]})}, 0)
    content = request.messages[0]["content"]
    assert "### Image Contents\nCat, Lynx\n\n### Question\nQ?\n\n" in content
    assert content.endswith("### LMM Response to Evaluate\nA.\n") and request.temperature == 0.0


def _template_records() -> list[dict]:
    records = []
    for i in range(10):
        records.append({"question_type": mmhal.QUESTION_TYPES[i % 8], "question_topic": "t", "image_id": f"img{i}",
                        "image_src": f"https://example.org/x/img{i}.jpg", "image_content": ["Cat", "Tree"],
                        "question": f"Question {i}?", "gt_answer": f"Answer {i}.", "model_answer": ""})
    records[3]["gt_answer"] = ""            # unusable
    records[5]["image_content"] = "Cat"      # not a list
    return records


@pytest.mark.parametrize("where", ["local", "s3"])
def test_mmhal_official_loader(where, tmp_path, request):
    from bpo_ray import storage
    from bpo_ray.config.evaluate import MMHalSettings

    if where == "local":
        root = str(tmp_path)
    else:
        root = request.getfixturevalue("s3_server")["root"] + "/mmhal"
    storage.write_text(storage.join(root, "response_template.json"), json.dumps(_template_records()))
    settings = MMHalSettings(source="mmhal", data=storage.join(root, "response_template.json"),
                             images=storage.join(root, "images"))
    loaded = mmhal.load_official(settings, None)
    assert len(loaded.items) == 8 and loaded.skipped == {"bad_mmhal_record": 1, "no_image_content": 1}
    first = loaded.items[0]
    assert first.image == storage.join(root, "images", "img0.jpg") and first.category == "attribute"
    assert first.meta["image_content"] == ["Cat", "Tree"] and first.reference == "Answer 0."
    assert [i.id for i in mmhal.load_official(settings, 3).items] == ["mmhal/0", "mmhal/1", "mmhal/2"]


def test_mmhal_config_needs_data():
    from bpo_ray.config.evaluate import MMHalSettings

    with pytest.raises(ValueError, match="response_template"):
        MMHalSettings(source="mmhal")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    from bpo_ray.world.build import build_world

    out = tmp_path_factory.mktemp("judge_world")
    build_world(str(out), seed=0, n_scenes=60, corpus_lines=50)
    return out


def test_mmhal_world_items_are_deterministic_and_true(small_world):
    from bpo_ray.config.evaluate import MMHalSettings

    items = mmhal.load_world(str(small_world), MMHalSettings(), None, seed=0).items
    again = mmhal.load_world(str(small_world), MMHalSettings(), None, seed=0).items
    assert [(i.id, i.question, i.reference) for i in items] == [(i.id, i.question, i.reference) for i in again]
    assert {i.category for i in items} == set(mmhal.WORLD_TYPES)
    scenes = {json.loads(line)["image"]: json.loads(line) for line in (small_world / "scenes.jsonl").read_text().splitlines()}
    for item in items:
        scene = scenes[str(Path(item.image).relative_to(small_world))]
        assert scene["split"] == "test"
        assert item.meta["image_content"] == sorted({o["kind"] for o in scene["objects"]})
        # the ground truth answer is right by the annotator's own rules, so it rates 6
        reply = ask(mmhal_prompt(item.meta["image_content"], item.question, item.reference, item.reference))
        assert mmhal.parse_rating(reply) == 6, (item, reply)
        if item.category == "adversarial":
            kind = grading.asked_kind(item.question)
            assert kind not in item.meta["image_content"] and item.reference.endswith("no.")


def test_mmhal_scorer():
    rows = [{"id": f"mmhal/{i}", "category": t, "judge_value": json.dumps(v), "judge_error": e}
            for i, (t, v, e) in enumerate([("attribute", 6, ""), ("attribute", 2, ""), ("counting", 0, "unparsable"),
                                           ("holistic", 3, "")])]
    metrics, details = mmhal.score(rows)
    assert metrics["score"] == pytest.approx(11 / 4) and metrics["hallucination_rate"] == pytest.approx(0.5)
    assert metrics["per_type"]["attribute"] == {"score": 4.0, "hallucination_rate": 0.5, "n": 2}
    assert list(metrics["per_type"]) == ["attribute", "counting", "holistic"]  # official order
    assert metrics["n_unparsed_ratings"] == 1 and [d["hallucination"] for d in details] == [False, True, True, False]


def test_report_has_mmhal_and_judge_proxy_sections(tmp_path):
    from bpo_ray.evaluate.report import markdown_report

    def model(score, rate, requests, hits):
        return {"benchmarks": {"mmhal": {"score": score, "hallucination_rate": rate,
                                         "per_type": {"attribute": {"score": score, "hallucination_rate": rate, "n": 4}}}},
                "judge_model": "bias-world-annotator",
                "judge_usage": {"run": {"requests": requests, "cache_hits": hits, "upstream_requests": requests - hits,
                                        "errors": 0, "prompt_tokens": 900, "completion_tokens": 30,
                                        "cost_usd": 0.0288, "saved_usd": 0.0}}}

    text = markdown_report({"base": model(3.5, 0.25, 10, 0), "bpo": model(4.0, 0.125, 10, 4)})
    assert "MMHal score (0-6)" in text and "| bpo | 4.0 (+0.5) | 12.5 (\u221212.5) |" in text
    assert "## MMHal-Bench by question type" in text and "4.00 / 12" in text
    assert "## Judge proxy" in text and "| bpo | 10 | 4 | 6 | 0 | 900 | 30 | 0.0288 | 0.0000 |" in text


# ---------------------------------------------------------------------------------------------
# Over HTTP: openai client -> judge proxy -> world annotator




def test_proxy_in_front_of_the_annotator(small_world, tmp_path, monkeypatch):
    import httpx
    import openai
    from PIL import Image

    from bpo_ray.config.serve import JudgeProxyConfig
    from bpo_ray.images import to_data_url
    from bpo_ray.serving.judge.proxy import create_judge_app
    from bpo_ray.world.judge_server import SceneIndex, create_app

    index = SceneIndex(str(small_world))
    assert len(index) >= 50
    monkeypatch.setenv("BPO_TEST_WJ_TOKENS", "evaluator:tok-world-judge-1")
    with AppServer(create_app(index)) as annotator_url:
        cfg = JudgeProxyConfig(upstream_base_url=f"{annotator_url}/v1", upstream_key_env="BPO_TEST_WJ_NO_KEY",
                               client_tokens_env="BPO_TEST_WJ_TOKENS", cache_path=str(tmp_path / "cache.sqlite"))
        with AppServer(create_judge_app(cfg, prefix="/judge/v1")) as proxy_url:
            client = openai.OpenAI(base_url=f"{proxy_url}/judge/v1", api_key="tok-world-judge-1", max_retries=0)

            def chat(content, **kw):
                reply = client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": content}],
                                                       temperature=0, seed=0, **kw)
                return reply.choices[0].message.content, reply

            grade, reply = chat(mmvet.grader_query("How many dogs are there?", "Two.", "Two."), max_tokens=3)
            assert grade == "1.0" and reply.usage.prompt_tokens > 100
            again, _ = chat(mmvet.grader_query("How many dogs are there?", "Two.", "Two."), max_tokens=3)
            assert again == "1.0"

            # claim verification with the image of a world scene, re-encoded by the client
            scenes = [json.loads(line) for line in (small_world / "scenes.jsonl").read_text().splitlines()]
            scene = scenes[0]
            present = scene["objects"][0]["kind"]
            absent = next(k for k in grading.vocab.OBJECT_KINDS if k not in {o["kind"] for o in scene["objects"]})
            with Image.open(small_world / scene["image"]) as img:
                url = to_data_url(img.convert("RGB"))
            for kind, expected in ((present, "Yes."), (absent, "No.")):
                text = annotator.CLAIM_TEMPLATE.format(article=grading.vocab.indefinite_article(kind), obj=kind)
                answer, _ = chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}])
                assert answer == expected

            # the judge_ranked strategy's own client (HelpSteer prompt, image attached): the scene decides
            from bpo_ray.generate.judge_ranked import JudgeClient
            from bpo_ray.world.scenes import Scene, SceneObject, describe_scene

            monkeypatch.setenv("BPO_TEST_WJ_CLIENT_KEY", "tok-world-judge-1")
            truth = describe_scene(Scene(scene["id"], tuple(SceneObject(o["kind"], o["colour"], o["position"])
                                                            for o in scene["objects"])))
            helpsteer = JudgeClient(f"{proxy_url}/judge/v1", "gpt-4", "BPO_TEST_WJ_CLIENT_KEY", max_retries=0)
            scores = helpsteer.score("Describe the image in detail.", truth,
                                     [truth, f"There is a red {absent} on the left."], url)
            assert [(s.helpfulness, s.correctness, s.coherence) for s in scores] == [(4, 4, 4), (0, 0, 4)]

            # refusals reach the client as 4xx with the annotator's reason
            with pytest.raises(openai.BadRequestError, match="not a judge prompt"):
                chat("Write a poem.")
            other = to_data_url(Image.new("RGB", (48, 48), (1, 2, 3)))
            with pytest.raises(openai.BadRequestError, match="not a scene of this world"):
                chat([{"type": "image_url", "image_url": {"url": other}},
                      {"type": "text", "text": annotator.CLAIM_TEMPLATE.format(article="a", obj="cup")}])

            usage = httpx.get(f"{proxy_url}/judge/v1/usage", headers={"Authorization": "Bearer tok-world-judge-1"}).json()
            run = usage["usage"]
            assert run["requests"] == 5 and run["cache_hits"] == 1 and run["upstream_requests"] == 6
            assert run["errors"] == 2 and run["prompt_tokens"] > 0 and run["cost_usd"] > 0
            stats = httpx.get(f"{annotator_url}/v1/stats").json()
            assert stats["answered"] == {"mmvet": 1, "claim": 2, "helpsteer": 1}


def test_annotator_cli_refuses_a_public_address(small_world, capsys):
    from bpo_ray.world.cli import main

    assert main(["judge", "--world", str(small_world), "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert main(["judge", "--world", str(small_world / "nowhere")]) == 2


def test_demo_starts_and_stops_the_annotator(small_world, tmp_path, monkeypatch):
    """The demo's own helpers: a client token for the proxy and its client, the annotator as a
    subprocess on loopback, answering until the block ends, gone after it."""
    import httpx

    from bpo_ray import demo
    from bpo_ray.serving.judge.auth import parse_client_tokens

    monkeypatch.delenv("BPO_JUDGE_TOKENS", raising=False)
    monkeypatch.setenv("BPO_JUDGE_TOKEN", "tok-user-given")
    demo.ensure_judge_tokens()
    assert parse_client_tokens(os.environ["BPO_JUDGE_TOKENS"]) == {"tok-user-given": "demo"}
    assert demo.demo_benchmarks()[-3:] == ["mmvet", "llava_bench", "mmhal"]

    log = tmp_path / "annotator.log"
    with demo.world_annotator(small_world, log) as url:
        assert url.startswith("http://127.0.0.1:")
        reply = httpx.post(f"{url}/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": mmvet.grader_query("How many cups are there?", "One.", "One.")}]}).json()
        assert reply["choices"][0]["message"]["content"] == "1.0"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/models", timeout=2)
    with pytest.raises(RuntimeError, match="exited"):
        with demo.world_annotator(tmp_path / "no-world", log):
            pass


def test_mmhal_parse_and_summary_match_the_official_script():
    """Golden output of LLaVA-RLHF's summarize_gpt_mmhal.py (tests/fixtures/parity/mmhal/README.md)."""
    root = Path(__file__).parent / "fixtures" / "parity" / "mmhal"
    replies = [r["choices"][0]["message"]["content"] for r in json.loads((root / "gpt4_replies.json").read_text())]
    lines = (root / "official_output.txt").read_text().splitlines()
    parsed = [mmhal.parse_rating(r) for r in replies]
    unparsed = [f"{i} {r}" for i, (r, p) in enumerate(zip(replies, parsed)) if p is None]
    official_unparsed = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("Warning: multiple or zero")]
    assert unparsed == official_unparsed and len(unparsed) >= 5
    ratings = [0 if p is None else p for p in parsed]
    summary = mmhal.summarize(ratings, [mmhal.QUESTION_TYPES[i % 8] for i in range(len(ratings))])
    assert f"Average score: {summary['score']:.2f}" in lines
    assert f"Hallucination rate: {summary['hallucination_rate']:.2f}" in lines
    per_type = ",".join(str(round(summary["per_type"][t]["score"], 2)) for t in mmhal.QUESTION_TYPES)
    assert f"Average score for each question type: {per_type}" in lines
