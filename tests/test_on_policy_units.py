"""On-policy strategy, unit level: sentences and verdicts, pair choice, yes/no parsing, annotation
files in COCO / Visual Genome format, the claim judge through the real judge proxy, the prompt
with a grounded prefix as training tokenises it."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from bpo_ray.metrics.chair import ObjectMentionExtractor
from bpo_ray.generate.on_policy import (Sample, continuation_prompt, pick_continuation, repeats_sentence,
                                        response_pair, sentence_target, verify_text)
from bpo_ray.generate.sentences import (SentenceVerdict, apply_verdicts, complete_sentences, first_hallucinated,
                                        is_grounded_answer, sentence_objects, split_sentences)
from bpo_ray.generate.verifiers import (CLAIM_TEMPLATE, AnnotationVerifier, DetectorVerifier, JudgeClaimVerifier,
                                        SceneTruthDetector, VerifierError, VerifyItem, claim_text, image_keys,
                                        load_annotations, load_synonyms, parse_yes_no)
from on_policy_support import ClaimJudge, JudgeProxyServer, pixels_key

SYN = {"cup": "cup", "coffee cup": "cup", "saucer": "saucer", "fork": "fork", "knife": "knife", "dog": "dog",
       "dog leash": "leash", "leash": "leash", "mouse": "mouse"}
EX = ObjectMentionExtractor(SYN)


def item(objects=None, uri="/data/images/scene-000001.png", color=(200, 10, 10)) -> VerifyItem:
    img = Image.new("RGB", (8, 8), color)
    return VerifyItem("scene-000001#0", img, uri, pixels_key(img), objects)


# ------------------------------------------------------------------------------ sentences
def test_split_sentences_keeps_punctuation_and_rejoins_to_the_text():
    text = "There is a red cup on the left.  There are two forks!Is it a dog? It is"
    got = split_sentences(text)
    assert got == ["There is a red cup on the left.", "There are two forks!", "Is it a dog?", "It is"]
    assert " ".join(got).replace(" ", "") == text.replace(" ", "")
    assert split_sentences("") == [] and split_sentences("One") == ["One"]
    assert split_sentences("Wait... yes.") == ["Wait...", "yes."]


def test_complete_sentences_drops_a_cut_off_tail_but_keeps_a_short_answer():
    assert complete_sentences("There is a cup. There is a") == ["There is a cup."]
    assert complete_sentences("One") == ["One"]
    assert complete_sentences("A cup. A fork.") == ["A cup.", "A fork."]


def test_sentence_objects_use_the_chair_matcher():
    got = sentence_objects("A coffee cup and a cup. A dog leash near the dog. Nothing here.", EX)
    assert got == [("A coffee cup and a cup.", ("cup",)), ("A dog leash near the dog.", ("leash", "dog")),
                   ("Nothing here.", ())]


def test_verdicts_first_hallucinated_and_grounded():
    sents = sentence_objects("There is a cup. There is a saucer. There is a fork. Nice.", EX)
    v = apply_verdicts(sents, {"cup": True, "saucer": False, "fork": True})
    assert [s.hallucinated for s in v] == [False, True, False, False]
    assert first_hallucinated(v) == 1
    assert not is_grounded_answer(v)
    ok = apply_verdicts(sents[:1] + sents[2:], {"cup": True, "fork": True})
    assert first_hallucinated(ok) is None and is_grounded_answer(ok)
    # grounded but naming nothing is not a usable chosen answer (recall would drop)
    assert not is_grounded_answer(apply_verdicts([("Nice.", ())], {}))
    with pytest.raises(KeyError, match="saucer"):
        apply_verdicts(sents, {"cup": True})


def _sample(text: str, truth: set[str], seed: int = 0) -> Sample:
    return Sample(text, seed, verify_text(text, item(sorted(truth)), EX, AnnotationVerifier(EX)))


def test_response_pair_prefers_fewest_hallucinations_and_needs_a_gap():
    truth = {"cup", "fork"}
    s = [_sample("A cup. A saucer.", truth), _sample("A cup. A fork.", truth),
         _sample("A dog. A saucer. A mouse.", truth), _sample("Nothing.", truth)]
    assert [x.hallucinated for x in s] == [1, 0, 3, 0] and [x.grounded for x in s] == [1, 2, 0, 0]
    assert response_pair(s, min_gap=1) == (1, 2)
    assert response_pair(s, min_gap=3) == (1, 2)
    assert response_pair(s, min_gap=4) == "no_grounding_gap"
    # "Nothing." has no hallucination but names no real object: never chosen
    assert response_pair([s[3], s[2]], 1) == "no_grounded_sample"
    assert response_pair([s[1], s[1]], 1) == "no_grounding_gap"
    # an answer that repeats a grounded sentence is never chosen
    rep = _sample("A cup. A cup!", truth)
    assert rep.hallucinated == 0 and rep.grounded == 2
    assert response_pair([rep, s[0], s[2]], 1) == (1, 2)


def test_sentence_target_and_continuations():
    truth = {"cup", "fork"}
    clean = _sample("A cup. A fork.", truth)
    bad = _sample("A cup. A saucer on a fork. A fork.", truth)
    assert sentence_target([clean, clean]) is None
    assert sentence_target([clean, bad, bad]) == (1, 1)
    conts = [_sample("Nothing more.", truth), _sample("A fork. A dog.", truth), _sample("A fork. A cup.", truth)]
    assert pick_continuation(conts, "sentence") == 1  # its first sentence is grounded and names a fork
    assert pick_continuation(conts, "to_end") == 2  # the whole rest must be grounded
    assert pick_continuation(conts[:2], "to_end") is None
    # no continuation that repeats the prefix (or itself) is chosen
    assert pick_continuation(conts, "sentence", prefix=["a fork"]) is None
    assert pick_continuation(conts + [_sample("A cup. A fork.", truth)], "sentence", prefix=["A fork."]) == 3
    assert pick_continuation([_sample("A cup. a CUP!", truth), conts[2]], "to_end") == 1
    assert repeats_sentence(["A fork.", "A cup."], ["a  fork"]) and not repeats_sentence(["A fork.", "A cup."])
    assert continuation_prompt("USER: <image>\nQ ASSISTANT:", "A cup.") == "USER: <image>\nQ ASSISTANT: A cup."
    assert continuation_prompt("USER: <image>\nQ ASSISTANT:", "") == "USER: <image>\nQ ASSISTANT:"


def test_verdict_json_is_provenance():
    v = SentenceVerdict("A cup and a dog.", ("cup", "dog"), (True, False))
    assert json.loads(json.dumps(v.as_json())) == ["A cup and a dog.", [["cup", True], ["dog", False]]]


# ------------------------------------------------------------------------------ judge claims
def test_claim_text_is_the_template_with_the_right_article():
    assert CLAIM_TEMPLATE == "Is there {article} {obj} in the image? Answer yes or no."
    assert claim_text("cup") == "Is there a cup in the image? Answer yes or no."
    assert claim_text("orange") == "Is there an orange in the image? Answer yes or no."


@pytest.mark.parametrize("reply,want", [
    ("Yes", True), ("yes.", True), ("**Yes**, there is.", True), ("No.", False), ("no, there is not", False),
    ("I can see it, so yes", True), ("There is none: no", False), ("", None), (None, None), ("Maybe.", None),
    ("Not sure: yes or no?", None), ("Nope", None), ("Yesterday", None),
])
def test_parse_yes_no(reply, want):
    assert parse_yes_no(reply) is want


TOKENS_ENV = "BPO_TEST_ONPOLICY_UNIT_TOKENS"


@pytest.fixture()
def proxy_and_judge(tmp_path, monkeypatch):
    red, blue = item(color=(200, 10, 10)), item(color=(10, 10, 200))
    judge = ClaimJudge({red.image_sha256: {"cup", "fork"}, blue.image_sha256: {"dog"}})
    monkeypatch.setenv(TOKENS_ENV, "tester:tok-123")
    monkeypatch.setenv("BPO_TEST_ONPOLICY_KEY", "tok-123")
    proxy = JudgeProxyServer(judge.url, str(tmp_path / "judge.sqlite"), TOKENS_ENV)
    yield proxy, judge, red, blue
    proxy.close()
    judge.close()


def test_judge_verifier_through_the_proxy_verdicts_cache_and_counts(proxy_and_judge):
    proxy, judge, red, blue = proxy_and_judge
    v = JudgeClaimVerifier(proxy.url, "claim-judge", token_env="BPO_TEST_ONPOLICY_KEY", max_retries=1)
    assert v.verify(red, ["cup", "saucer", "fork"]) == {"cup": True, "saucer": False, "fork": True}
    assert v.verify(blue, ["dog", "cup"]) == {"dog": True, "cup": False}
    assert len(judge.claims) == 5 and v.stats["judge_calls"] == 5 and v.stats["judge_cache_hits"] == 0
    assert v.verify(red, ["cup"]) == {"cup": True} and v.stats["judge_local_hits"] == 1
    # a fresh verifier (another actor) asks again: the proxy answers from its cache
    w = JudgeClaimVerifier(proxy.url, "claim-judge", token_env="BPO_TEST_ONPOLICY_KEY")
    assert w.verify(red, ["saucer", "fork"]) == {"saucer": False, "fork": True}
    assert w.stats["judge_calls"] == 2 and w.stats["judge_cache_hits"] == 2 and len(judge.claims) == 5


def test_judge_verifier_unusable_reply_and_outage_are_retried_then_raise(proxy_and_judge):
    proxy, judge, red, _ = proxy_and_judge
    judge.mode = "garbage"
    v = JudgeClaimVerifier(proxy.url, "claim-judge", token_env="BPO_TEST_ONPOLICY_KEY", max_retries=2, backoff_s=0)
    with pytest.raises(VerifierError) as err:
        v.verify(red, ["knife"])
    assert err.value.reason == "judge_unusable_reply" and v.stats["judge_calls"] == 3 and v.stats["judge_retries"] == 2
    judge.mode = "error"
    with pytest.raises(VerifierError) as err:
        v.verify(red, ["mouse"])
    assert err.value.reason == "judge_unavailable"
    # a wrong token is an outage for the verifier too (401 from the proxy), never a verdict
    os.environ["BPO_TEST_ONPOLICY_WRONG_TOKEN"] = "not-a-proxy-token"
    bad = JudgeClaimVerifier(proxy.url, "claim-judge", token_env="BPO_TEST_ONPOLICY_WRONG_TOKEN", max_retries=0)
    judge.mode = "ok"
    with pytest.raises(VerifierError, match="judge_unavailable"):
        bad.verify(red, ["cup"])


# ------------------------------------------------------------------------------ annotations
def test_annotation_verifier_uses_the_record_objects_and_canonical_names():
    v = AnnotationVerifier(EX)
    assert v.verify(item(["coffee cup", "dog"]), ["cup", "dog", "fork"]) == {"cup": True, "dog": True, "fork": False}
    with pytest.raises(VerifierError, match="no_annotations"):
        v.verify(item(None), ["cup"])


def test_coco_instances_file(tmp_path):
    coco = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                       {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"}],
            "annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]},
                            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1]},
                            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1]}],
            "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "fork"}]}
    path = tmp_path / "instances_train2014.json"
    path.write_text(json.dumps(coco))
    table = load_annotations(str(path), "coco")
    assert table["COCO_train2014_000000000009.jpg"] == {"cup", "fork"} and table["25"] == set()
    v = AnnotationVerifier(EX, table)
    assert v.verify(item(None, "s3://b/train2014/COCO_train2014_000000000009.jpg"), ["cup", "dog"]) == \
        {"cup": True, "dog": False}
    assert v.verify(item(None, "/x/000000000009.jpg"), ["fork"]) == {"fork": True}  # COCO 2017 name -> id 9
    assert v.verify(item(None, "/x/COCO_train2014_000000000025.jpg"), ["cup"]) == {"cup": False}
    with pytest.raises(VerifierError, match="no_annotations"):
        v.verify(item(None, "/x/unknown.jpg"), ["cup"])
    path.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        load_annotations(str(path), "coco")


def test_visual_genome_objects_file(tmp_path):
    vg = [{"image_id": 1, "objects": [{"object_id": 1, "names": ["Dog"]}, {"object_id": 2, "names": ["leash"]}]},
          {"image_id": 2, "objects": [{"object_id": 3, "names": ["coffee cup", "mug"]}]}]
    path = tmp_path / "objects.json"
    path.write_text(json.dumps(vg))
    table = load_annotations(str(path), "visual_genome")
    assert table["1.jpg"] == {"dog", "leash"} and table["2"] == {"coffee cup", "mug"}
    v = AnnotationVerifier(EX, table)
    assert v.verify(item(None, "/vg/VG_100K/2.jpg"), ["cup", "dog"]) == {"cup": True, "dog": False}
    path.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ValueError, match="Visual Genome"):
        load_annotations(str(path), "visual_genome")
    assert image_keys("/a/COCO_val2014_000000000042.jpg") == ["COCO_val2014_000000000042.jpg",
                                                             "COCO_val2014_000000000042", "42"]


def test_load_synonyms_from_world_json_and_chair_txt(tmp_path):
    (tmp_path / "world.json").write_text(json.dumps({"synonyms": {"biro": "pen", "pen": "pen"}}))
    assert load_synonyms(str(tmp_path / "world.json")) == {"biro": "pen", "pen": "pen"}
    (tmp_path / "synonyms.txt").write_text("person, girl, boy\ndining table, table\n")
    syn = load_synonyms(str(tmp_path / "synonyms.txt"))
    assert syn["girl"] == "person" and syn["table"] == "dining table"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="synonyms"):
        load_synonyms(str(tmp_path / "bad.json"))


def test_detector_verifier_interface_with_scene_truth():
    v = DetectorVerifier(SceneTruthDetector(AnnotationVerifier(EX)))
    assert v.name == "detector"
    assert v.verify(item(["cup", "mouse"]), ["cup", "dog", "mouse"]) == {"cup": True, "dog": False, "mouse": True}
    assert v.verify(item(["cup"]), []) == {} and v.stats["detector_calls"] == 1


# ------------------------------------------------------------------------------ training view
def test_prefix_in_prompt_is_context_and_the_boundary_tokenises_as_generated(tiny_models):
    """The shared grounded prefix sits in ``prompt`` after ``ASSISTANT:``: training keeps the prompt
    as is, scores only chosen / rejected tokens, and those are exactly the tokens of the answer
    continuing the prefix (the prompt's ids are a prefix of prompt + answer ids)."""
    from bpo_ray.models.loading import load_mllm
    from bpo_ray.models.prompts import pair_prompt as format_prompt
    from bpo_ray.train.logprobs import encode_pair

    _, proc = load_mllm(tiny_models["mllm"], device="cpu")
    base = "USER: <image>\nDescribe the image. ASSISTANT:"
    prompt = continuation_prompt(base, "There is a red cup on the left.")
    assert format_prompt(prompt) == prompt
    img = Image.new("RGB", (32, 32), (1, 2, 3))
    chosen, rejected = "There is a blue fork at the top.", "There is a green dog on the right."
    enc = encode_pair(proc, img, prompt, chosen, rejected, max_length=512)
    tok = proc.tokenizer
    full = proc(images=[img], text=[f"{prompt} {chosen}"])["input_ids"][0]
    assert list(full[:len(enc.prompt_ids)]) == enc.prompt_ids
    assert enc.chosen_answer_ids[:-1] == list(full[len(enc.prompt_ids):])
    assert enc.chosen_answer_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.chosen_answer_ids[:-1]).strip() == chosen
    assert tok.decode(enc.rejected_answer_ids[:-1]).strip() == rejected
    # the prefix-free prompt is unchanged and a bare question is still wrapped
    assert format_prompt(base) == base and format_prompt("What is it?").startswith("USER: <image>\n")


def test_on_policy_config_validation():
    from bpo_ray.config import load_config

    cfg = load_config("tiny", ["generate.strategies=[on_policy]", "generate.on_policy.pair_level=response",
                               "generate.on_policy.verifier.kind=judge"])
    assert cfg.generate.on_policy.pair_level == "response" and cfg.generate.on_policy.sampling.temperature == 0.7
    for bad in ("generate.on_policy.pair_level=word", "generate.on_policy.num_samples=0",
                "generate.on_policy.verifier.kind=oracle", "generate.on_policy.nope=1"):
        with pytest.raises(Exception):
            load_config("tiny", [bad])
    assert os.environ.get("OPENAI_API_KEY", "") not in cfg.model_dump_json() or not os.environ.get("OPENAI_API_KEY")
