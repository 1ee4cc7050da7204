"""Generate stage, fast tier: sources and quarantine reasons, filters, the Table 1 prompt, seeds and
noise, the judge client against a real loopback HTTP server, shard commits. No Ray here.

Helpers at the top (bad-input builder, judge server) are shared with test_generate_pipeline.py.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bpo_ray.config.generate import FilterConfig, SamplingConfig
from bpo_ray.generate import pairs as pairs_mod
from bpo_ray.generate.error_injection import ERROR_INJECTION_PROMPT, clean_injected, injection_prompt
from bpo_ray.generate.judge_ranked import JudgeClient, JudgeError, choose_pair, parse_scores
from bpo_ray.generate.seeds import noise_seed, sampling_seed
from bpo_ray.generate.shards import PlanMismatch, ShardStore, total_counts
from bpo_ray.generate.sources import ITEM_COLUMNS, SourceError, assign_shards, read_source
from bpo_ray.noise import alphas_cumprod, seeded_noise
from bpo_ray.schemas import PAIR_SCHEMA, read_parquet

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"

# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def png_bytes(size: int = 32, seed: int = 0) -> bytes:
    arr = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


def write_bad_source(folder: Path, good_records: list[dict], good_image_dir: str) -> tuple[Path, Counter, int]:
    """A JSONL source mixing ``good_records`` with one record per kind of bad input.

    Returns ``(path, expected quarantine reasons (per item), expected total items)``. Images of
    the good records are resolved against ``good_image_dir``; bad images live in ``folder``.
    Run it with ``generate.max_image_bytes=100000``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    good_png = png_bytes()
    (folder / "ok.png").write_bytes(good_png)
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png_bytes(64, 1)[:200])
    (folder / "text.png").write_bytes(b"this is not an image at all")
    (folder / "huge.png").write_bytes(os.urandom(150_000))
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 81M pixels, ~10 KB on disk
    (folder / "bomb.png").write_bytes(bomb.getvalue())
    ok = str(folder / "ok.png")

    lines: list[bytes] = []
    total = 0
    for rec in good_records:
        rec = dict(rec, image=os.path.join(good_image_dir, rec["image"]))
        lines.append(json.dumps(rec).encode())
        total += sum(1 for t in rec["conversations"] if t["from"] == "human")
    expected: Counter = Counter()

    def bad(obj, reason: str, raw: bytes | None = None, items: int = 1) -> None:
        nonlocal total
        lines.append(raw if raw is not None else json.dumps(obj).encode())
        expected[reason] += items
        total += items

    bad(None, "malformed_json", raw=b'{"id": "cut-off", "image": "ok.png", "conversa')
    bad(None, "non_utf8_text", raw=b'{"id": "latin1", "image": "ok.png", "conversations": '
                                    b'[{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "x"}]}')
    bad([1, 2], "not_an_object")
    bad({"image": ok, "conversations": _conv("q?", "a.")}, "missing_id")
    bad({"id": ["x"], "image": ok, "conversations": _conv("q?", "a.")}, "bad_id_type")
    bad({"id": good_records[0]["id"], "image": ok, "conversations": _conv("q?", "a.")}, "duplicate_id")
    bad({"id": "no-conv", "image": ok}, "missing_conversations")
    bad({"id": "str-conv", "image": ok, "conversations": "hello"}, "bad_conversations_type")
    bad({"id": "empty-conv", "image": ok, "conversations": []}, "empty_conversations")
    bad({"id": "int-value", "image": ok, "conversations": [{"from": "human", "value": 3}]}, "malformed_turn")
    bad({"id": "robot", "image": ok, "conversations": [{"from": "robot", "value": "hi"}]}, "unknown_role")
    bad({"id": "gpt-first", "image": ok, "conversations": [{"from": "gpt", "value": "hi"}]}, "answer_without_question")
    bad({"id": "no-image", "conversations": _conv("q?", "a.")}, "missing_image_field")
    bad({"id": "int-image", "image": 7, "conversations": _conv("q?", "a.")}, "bad_image_type")
    bad({"id": "empty-answer", "image": ok, "conversations": _conv("What is it?", "  ")}, "empty_answer")
    bad({"id": "empty-question", "image": ok, "conversations": _conv("", "A cup.")}, "empty_question")
    for name, reason in [("missing.png", "missing_image"), ("zero.png", "empty_image"),
                         ("truncated.png", "corrupt_image"), ("text.png", "unreadable_image"),
                         ("huge.png", "image_too_large"), ("bomb.png", "image_too_large")]:
        bad({"id": f"img-{name}", "image": name, "conversations": _conv("What is it?", "A red cup.")}, reason)
    # One usable turn followed by an unanswered question: 2 items, 1 quarantined.
    lines.append(json.dumps({"id": "trailing", "image": ok, "conversations":
                             _conv("What colour is the cup?", "The cup is red.") + [{"from": "human", "value": "And?"}]}).encode())
    expected["missing_answer"] += 1
    total += 2
    path = folder / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected, total


class JudgeServer:
    """A real OpenAI-compatible HTTP endpoint on loopback that scores answers by a fixed rule.

    helpfulness = min(4, words // 2); correctness = 4 * share of the reference's content words
    present; coherence = 4 * share of alphabetic characters plus a fixed per-text jitter (so that
    the gibberish of random-init test models still spreads over the scale); complexity = distinct
    words // 3, verbosity = characters // 20 complete HelpSteer's five attributes.
    ``mode`` = "ok" | "garbage" | "error" | "flaky" (the first reply of every prompt is garbage).
    Every scored response is recorded so tests can check the pairs against the judge's scores.
    """

    def __init__(self, mode: str = "ok", expect_key: str | None = None):
        self.mode = mode
        self.expect_key = expect_key
        self.scored: dict[str, float] = {}
        self.seen: set[str] = set()
        self.calls = 0
        self.bad_auth = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.calls += 1
                if server.expect_key and self.headers.get("Authorization") != f"Bearer {server.expect_key}":
                    server.bad_auth += 1
                if server.mode == "error":
                    self.send_response(500)
                    self.end_headers()
                    return
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
                reply = server.reply(text)
                out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": reply}}]}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def score(self, reference: str, response: str) -> dict[str, int]:
        words = re.findall(r"\S+", response)
        ref = pairs_mod.content_words(reference)
        got = pairs_mod.content_words(response)
        overlap = sum((ref & got).values()) / max(1, sum(ref.values()))
        alpha = sum(c.isalpha() for c in response) / max(1, len(response))
        return {"helpfulness": min(4, len(words) // 2), "correctness": round(4 * overlap),
                "coherence": min(4, round(4 * alpha) + sum(map(ord, response)) % 3),
                "complexity": min(4, len(set(words)) // 3), "verbosity": min(4, len(response) // 20)}

    def reply(self, prompt: str) -> str:
        first_time = prompt not in self.seen
        self.seen.add(prompt)
        if self.mode == "garbage" or (self.mode == "flaky" and first_time):
            return "I think they are all fine."
        reference = re.search(r"\[Reference answer\]\n(.*?)\n\[End of reference answer\]", prompt, re.S).group(1)
        responses = [m.group(2) for m in re.finditer(r"\[Response (\d+)\]\n(.*?)\n\[End of Response \1\]", prompt, re.S)]
        scores = [self.score(reference, r) for r in responses]
        for r, s in zip(responses, scores):
            self.scored[r] = float(s["helpfulness"] + s["correctness"] + s["coherence"])
        return "Reasoning: compared each response with the reference.\n" + json.dumps({"scores": scores})

    def close(self) -> None:
        self.httpd.shutdown()


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_read_source_explodes_turns_with_history(tmp_path):
    rec = {"id": "r1", "image": "img.png", "source": "conversation", "conversations":
           _conv("What objects are there?", "A cup.") + [{"from": "human", "value": "What colour?"},
                                                         {"from": "gpt", "value": "Red."}]}
    src = tmp_path / "s.json"
    src.write_text(json.dumps([rec]))
    read = read_source(str(src), images_root=str(tmp_path / "imgs"))
    assert [it["item_id"] for it in read.items] == ["r1#0", "r1#1"]
    first, second = read.items
    assert first["image_uri"] == str(tmp_path / "imgs" / "img.png")
    assert first["question"] == "What objects are there?" and first["answer"] == "A cup."
    assert json.loads(second["history"]) == [["What objects are there?", "A cup."]]
    assert second["llava_prompt"] == ("USER: <image>\nWhat objects are there? ASSISTANT: A cup.</s>"
                                      "USER: What colour? ASSISTANT:")
    assert first["source"] == "conversation" and [it["order"] for it in read.items] == [0, 1]
    assert tuple(first) == ITEM_COLUMNS  # the row layout every pipeline stage passes through


def test_every_bad_record_is_quarantined_with_its_reason(tmp_path):
    good = [{"id": "g1", "image": "a.png", "conversations": _conv("Is there a cup?", "Yes.")}]
    path, expected, total = write_bad_source(tmp_path, good, str(tmp_path))
    read = read_source(str(path))
    assert len(read.items) == total
    reasons = Counter(it["reason"] for it in read.items if it["status"] != "ok")
    image_reasons = {"missing_image", "empty_image", "corrupt_image", "unreadable_image", "image_too_large"}
    assert reasons == Counter({k: v for k, v in expected.items() if k not in image_reasons})
    ok_ids = sorted(it["item_id"] for it in read.items if it["status"] == "ok")
    assert "g1#0" in ok_ids and "trailing#0" in ok_ids and "trailing#1" not in ok_ids
    raw = next(it["raw"] for it in read.items if it["reason"] == "non_utf8_text")
    assert "caf\ufffd" in raw  # the bad byte is shown, replaced, never crashes the writer


def test_json_array_with_truncated_tail_keeps_the_records_before_it(tmp_path):
    recs = [{"id": f"r{i}", "image": "x.png", "conversations": _conv("q?", "a.")} for i in range(3)]
    text = json.dumps(recs)
    (tmp_path / "cut.json").write_text(text[: text.rindex("{") + 10])
    read = read_source(str(tmp_path / "cut.json"))
    assert [it["status"] for it in read.items] == ["ok", "ok", "quarantined"]
    assert read.items[-1]["reason"] == "malformed_json"


def test_sample_items_spreads_a_seeded_sample_over_the_whole_source(tmp_path):
    recs = [{"id": f"r{i}", "image": f"{i}.png", "conversations": _conv("q?", "a.")} for i in range(200)]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    first = read_source(str(tmp_path / "s.jsonl"), max_items=20).items
    assert [it["item_id"] for it in first] == [f"r{i}#0" for i in range(20)]
    sample = read_source(str(tmp_path / "s.jsonl"), sample_items=20, seed=3).items
    ids = [int(it["item_id"][1:-2]) for it in sample]
    assert len(set(ids)) == 20 and ids == sorted(ids) and max(ids) >= 100  # spread, in source order
    assert [it["order"] for it in sample] == list(range(20))
    again = read_source(str(tmp_path / "s.jsonl"), sample_items=20, seed=3).items
    other = read_source(str(tmp_path / "s.jsonl"), sample_items=20, seed=4).items
    assert [it["item_id"] for it in again] == [it["item_id"] for it in sample]
    assert [it["item_id"] for it in other] != [it["item_id"] for it in sample]
    assert len(read_source(str(tmp_path / "s.jsonl"), sample_items=500).items) == 200


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        read_source(str(tmp_path / "nope.jsonl"))


def test_shards_are_deterministic(tmp_path):
    recs = [{"id": f"r{i}", "image": "x.png", "conversations": _conv("q?", "a.")} for i in range(10)]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    items = read_source(str(tmp_path / "s.jsonl")).items
    assert assign_shards(items, 4) == 3
    assert [it["shard"] for it in items] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


# --------------------------------------------------------------------------------------------
# Filters and pairs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chosen,rejected,reason", [
    ("There is a red cup.", "   ", "empty"),
    ("There is a red cup.", "there is a RED cup", "identical_to_chosen"),
    ("There is a red cup on the left.", "On the left there is a red cup.", "no_content_change"),
    ("Yes.", "There is a red cup and a blue dog and two green locks at the top left of it all.", "length_ratio"),
    ("There is a red cup.", "There is a blue cup.", None),
    ("Yes.", "No.", None),
    ("There are two cups.", "There are three cups.", None),
])
def test_filter_reasons(chosen, rejected, reason):
    assert pairs_mod.filter_reason(chosen, rejected, FilterConfig()) == reason


def test_item_outcome_counts_every_negative():
    item = {"status": "ok", "item_id": "r#0", "source": "s", "image_uri": "/i.png", "image_sha256": "ab",
            "llava_prompt": "USER: <image>\nq ASSISTANT:", "answer": "There is a red cup.", "question": "q",
            "neg_image_weakened": json.dumps([
                {"text": "There is a blue cup.", "noise_step": 500, "seed": 1, "generator": "m", "sampling": {}},
                {"text": "There is a blue cup!", "noise_step": 900, "seed": 2, "generator": "m", "sampling": {}}]),
            "neg_error_injection": json.dumps([{"failed": "prompt_too_long"}])}
    res = pairs_mod.item_outcome(item, ["image_weakened", "error_injection"], FilterConfig())
    assert res["outcome"] == "paired" and len(res["pairs"]) == 1
    assert sorted(res["reasons"]) == ["failed.prompt_too_long", "filter.duplicate_negative"]
    pair = res["pairs"][0]
    assert pair["chosen"] == "There is a red cup." and pair["rejected"] == "There is a blue cup."
    again = pairs_mod.item_outcome(item, ["image_weakened", "error_injection"], FilterConfig())
    assert again["pairs"][0]["id"] == pair["id"]  # stable id
    only_failures = dict(item, neg_image_weakened="[]")
    res = pairs_mod.item_outcome(only_failures, ["image_weakened", "error_injection"], FilterConfig())
    assert res["outcome"] == "quarantined" and res["quarantine"]["reason"] == "prompt_too_long"


# --------------------------------------------------------------------------------------------
# Error injection prompt
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not glob.glob(str(SEEDS / "000_*.txt")), reason="the paper's text (shared/seeds) is not beside this checkout")
def test_error_injection_prompt_is_table_1_verbatim():
    paper = Path(glob.glob(str(SEEDS / "000_*.txt"))[0]).read_text()
    assert ERROR_INJECTION_PROMPT in paper
    assert ERROR_INJECTION_PROMPT.startswith("I will give you a question and a response about an image.")
    prompt = injection_prompt("Is there a cup?", "Yes, a red cup.")
    assert prompt.startswith("USER: I will give you")
    assert prompt.endswith("Question: Is there a cup? Response: Yes, a red cup. Modified Response: ASSISTANT:")
    assert "New Question" not in prompt


def test_clean_injected_keeps_only_the_modified_response():
    assert clean_injected(" Modified response: there is a blue cup. Question: next one") == "there is a blue cup."
    assert clean_injected("two dogs\n\nUSER: more") == "two dogs"


# --------------------------------------------------------------------------------------------
# Seeds and noise
# --------------------------------------------------------------------------------------------


def test_noise_seed_is_per_item_and_step_and_matches_the_schedule(tiny_models):
    from bpo_ray.generate.image_weakened import weaken

    x0 = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(3))
    a = weaken(x0, ["a#0", "b#0"], 500, base_seed=7, num_steps=1000)
    assert torch.equal(a, weaken(x0, ["a#0", "b#0"], 500, base_seed=7, num_steps=1000))
    assert torch.equal(a[1:], weaken(x0[1:], ["b#0"], 500, base_seed=7, num_steps=1000))  # batch-independent
    abar = float(alphas_cumprod(1000)[500])
    eps = (a[0] - abar ** 0.5 * x0[0]) / (1 - abar) ** 0.5
    torch.testing.assert_close(eps, seeded_noise((1, 16, 128), noise_seed(7, "a#0", 500))[0], atol=1e-4, rtol=1e-4)
    assert noise_seed(7, "a#0", 500) != noise_seed(7, "a#0", 900) != noise_seed(8, "a#0", 500)
    assert sampling_seed(0, "image_weakened", "a#0") == sampling_seed(0, "image_weakened", "a#0")


def test_every_generated_token_is_conditioned_on_the_noisy_image(tiny_models):
    """Teacher-forced logits of the generated answer under the *noisy* features reproduce
    generate's per-step logits at every step, and differ from those under the clean features at
    every step: the weakened image is in the conditioning of each token, not only the first."""
    from bpo_ray.generate.backends import MLLMRunner
    from bpo_ray.models.mllm import generate_from_features
    from bpo_ray.generate.image_weakened import weaken
    from bpo_ray.models.mllm import merge_image_features
    from bpo_ray.models.prompts import build_prompt

    runner = MLLMRunner(tiny_models["mllm"], device="cpu")
    model, tok = runner.model, runner.tokenizer
    img = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    enc = runner.encode([img], [build_prompt("Describe the image in detail.")])
    clean = runner.features(enc["pixel_values"])
    noisy = weaken(clean, ["item#0"], 500, base_seed=0, num_steps=1000)
    out = generate_from_features(model, enc["input_ids"], enc["attention_mask"], noisy,
                                    SamplingConfig(max_new_tokens=12), tok.pad_token_id, eos_token_id=-1,
                                    output_logits=True)
    gen = out.sequences[0]
    steps = torch.stack([lg[0] for lg in out.logits])  # (T, vocab)
    full = torch.cat([enc["input_ids"][0], gen[:-1]]).unsqueeze(0)
    n_prompt = enc["input_ids"].shape[1]

    def teacher_forced(features):
        with torch.no_grad():
            logits = model(inputs_embeds=merge_image_features(model, full, features)).logits[0]
        return logits[n_prompt - 1:]

    torch.testing.assert_close(teacher_forced(noisy), steps, atol=1e-3, rtol=1e-3)
    diff_clean = (teacher_forced(clean) - steps).abs().amax(dim=-1)
    assert len(diff_clean) == 12 and bool((diff_clean > 1e-3).all()), diff_clean


# --------------------------------------------------------------------------------------------
# Judge
# --------------------------------------------------------------------------------------------


def test_parse_scores_and_pair_choice():
    reply = 'Thinking... {"scores": [{"helpfulness": 4, "correctness": 3, "coherence": 4}, ' \
            '{"helpfulness": 1, "correctness": 0, "coherence": 2}]}'
    scores = parse_scores(reply, 2)
    assert [s.total for s in scores] == [11.0, 3.0]
    with pytest.raises(JudgeError, match="expected 3"):
        parse_scores(reply, 3)
    with pytest.raises(JudgeError):
        parse_scores('{"scores": [{"helpfulness": 9, "correctness": 0, "coherence": 0}]}', 1)
    assert choose_pair([8, 9, 8.5, 2], 2.0, seed=1) == (1, 3)
    assert choose_pair([5, 5.5, 4], 2.0, seed=1) is None
    picks = {choose_pair([9, 1, 2, 3], 2.0, seed=s)[1] for s in range(30)}
    assert picks == {1, 2, 3}  # the worse answer is drawn at random among the clearly worse


def test_judge_client_over_http(monkeypatch):
    monkeypatch.setenv("BPO_TEST_JUDGE_KEY", "sk-test-123")
    server = JudgeServer(expect_key="sk-test-123")
    try:
        client = JudgeClient(server.url, "judge", token_env="BPO_TEST_JUDGE_KEY", max_retries=0)
        scores = client.score("Is there a cup?", "Yes, there is a red cup.",
                              ["Yes, there is a red cup on the table.", "zz"], image_data_url="data:image/png;base64,AAAA")
        assert scores[0].total > scores[1].total
        assert server.calls == 1 and server.bad_auth == 0
        server.mode = "garbage"
        with pytest.raises(JudgeError) as info:
            client.score("q", "a", ["x", "y"])
        assert info.value.reason == "judge_unparsable"
        server.mode = "error"
        with pytest.raises(JudgeError) as info:
            client.score("q", "a", ["x", "y"])
        assert info.value.reason == "judge_error"
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def _result(order: int, outcome: str, n_pairs: int = 0) -> dict:
    pair = {"id": f"p{order}", "source": "s", "source_id": f"r{order}#0", "image": "/i.png", "image_sha256": "ab",
            "prompt": "p", "chosen": "c", "rejected": "r", "strategy": "image_weakened", "noise_step": 500,
            "generator": "m", "sampling": "{}", "seed": 1}
    q = {"source_id": f"r{order}", "stage": "read", "reason": "missing_id", "raw": "{}"} if outcome == "quarantined" else None
    return {"order": order, "outcome": outcome, "pairs": [dict(pair, id=f"p{order}-{k}") for k in range(n_pairs)],
            "quarantine": q, "reasons": ["quarantine.missing_id"] if q else []}


def test_shard_store_commits_resumes_and_sums(tmp_path):
    store = ShardStore(str(tmp_path / "out"))
    assert store.check_or_write_plan({"a": 1}) is False
    store.commit(0, [_result(1, "paired", 2), _result(0, "quarantined")])
    store.commit(2, [_result(5, "filtered")])
    assert store.done_shards() == {0, 2}
    assert store.check_or_write_plan({"a": 1}) is True
    with pytest.raises(PlanMismatch, match="changed: a"):
        store.check_or_write_plan({"a": 2})
    counts = total_counts(store.markers())
    assert (counts.items_in, counts.paired, counts.filtered, counts.quarantined, counts.pairs_written) == (3, 1, 1, 1, 2)
    table = read_parquet(str(tmp_path / "out" / "pairs"), PAIR_SCHEMA)
    assert table.column("id").to_pylist() == ["p1-0", "p1-1"]
    with pytest.raises(RuntimeError, match="source has 4"):
        total_counts(store.markers(), expected_items=4)
    store.clear()
    assert store.done_shards() == set() and not (tmp_path / "out" / "pairs").exists()


def test_partial_sampling_override_keeps_stage_defaults():
    from bpo_ray.config import load_config

    cfg = load_config("tiny", ["generate.injector.sampling.max_new_tokens=7",
                               "generate.judge_ranked.sampling.max_new_tokens=7"])
    inj, judge = cfg.generate.injector.sampling, cfg.generate.judge_ranked.sampling
    assert (inj.max_new_tokens, inj.temperature, inj.top_p) == (7, 0.8, 0.95)  # reference code's sampling
    assert (judge.max_new_tokens, judge.temperature) == (7, 0.7)  # seed 002


def test_cli_reports_a_missing_source_clearly(tmp_path, capsys):
    from bpo_ray.generate.cli import main

    code = main(["--config", "tiny", "--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_generation_groups_make_sampled_negatives_independent_of_batch_bundling(tiny_models):
    """Ray Data may hand an actor any bundle of blocks; each generation group is generated as one
    batch, so a group's sampled rewrites are the same alone, together with another group, or in
    another order (without groups, the batch's seed and padding would follow the bundle)."""
    import numpy as np

    from bpo_ray.generate.error_injection import COLUMN, ErrorInjector

    answers = ["There is a red cup on the left.", "Two.", "There are two blue dogs, at the top and on the right.",
               "Yes.", "Green.", "There is a yellow key in the center."]
    injector = ErrorInjector(tiny_models["text_llm"], {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.95}, seed=3)

    def run(rows: list[int]) -> dict[str, str]:
        batch = {"order": np.array(rows), "item_id": np.array([f"r{i}#0" for i in rows], dtype=object),
                 "status": np.array(["ok"] * len(rows), dtype=object), "group": np.array([i // 3 for i in rows]),
                 "question": np.array(["Describe the image."] * len(rows), dtype=object),
                 "answer": np.array([answers[i] for i in rows], dtype=object)}
        out = injector(batch)
        return {f"r{i}": out[COLUMN][k] for k, i in enumerate(rows)}

    together = run([0, 1, 2, 3, 4, 5])
    assert run([0, 1, 2]) | run([3, 4, 5]) == together
    assert run([3, 4, 5, 0, 1, 2]) == together


def test_group_blocks_cut_each_shard_into_fixed_groups():
    from bpo_ray.generate.pipeline import group_blocks

    items = [{"order": i, "shard": i // 10, "item_id": f"x{i}"} for i in range(25)]
    blocks = group_blocks(items, shard_size=10, group_size=4)
    assert [b.num_rows for b in blocks] == [4, 4, 2, 4, 4, 2, 4, 1]
    groups = [set(b.column("group").to_pylist()) for b in blocks]
    assert all(len(g) == 1 for g in groups) and len({g.pop() for g in groups}) == len(blocks)
    # resuming a later shard alone cuts the same groups
    assert [b.column("item_id").to_pylist() for b in group_blocks(items[20:], 10, 4)] == \
        [b.column("item_id").to_pylist() for b in blocks[-2:]]


def test_actor_pools_start_sized_for_the_work():
    from bpo_ray.config.generate import PoolConfig
    from bpo_ray.generate.pipeline import initial_pool_size

    pool = PoolConfig(min_size=1, max_size=2, num_cpus=0.5, batch_size=8)
    assert initial_pool_size(pool, None) == 1            # unknown work: min_size, Ray Data scales up
    assert initial_pool_size(pool, 3) == 1               # a tiny run: one model load
    assert initial_pool_size(pool, 96) == 2              # a real run: both actors from the start
    assert initial_pool_size(PoolConfig(min_size=2, max_size=4), 1) == 2


def test_initial_actors_leave_a_cpu_for_the_task_stages():
    """Initial actors beyond min_size only where free resources hold them with a CPU to spare:
    the two-node test cluster (4 CPUs) once started three 1-CPU samplers and a 0.5-CPU injector,
    and the repartition task between the stages waited for a CPU for good."""
    from bpo_ray.config.generate import PoolConfig
    from bpo_ray.generate.pipeline import TASK_CPUS, initial_pool_sizes

    sampler = PoolConfig(min_size=1, max_size=3, num_cpus=1.0, batch_size=1)
    injector = PoolConfig(min_size=1, max_size=1, num_cpus=0.5, batch_size=4)
    pools = [("sampler", sampler), ("injector", injector)]
    sizes = initial_pool_sizes(pools, 96, {"CPU": 4.0})
    assert sizes == {"sampler": 2, "injector": 1}
    assert sizes["sampler"] * 1.0 + 0.5 + TASK_CPUS <= 4.0
    assert initial_pool_sizes(pools, 96, {"CPU": 8.0}) == {"sampler": 3, "injector": 1}
    # the demo's 2-CPU instance: both 0.5-CPU samplers would leave half a CPU, so one starts
    tiny = [("sampler", PoolConfig(min_size=1, max_size=2, num_cpus=0.5)), ("injector", injector)]
    assert initial_pool_sizes(tiny, 96, {"CPU": 2.0}) == {"sampler": 1, "injector": 1}
    assert initial_pool_sizes(tiny, 96, {"CPU": 4.0}) == {"sampler": 2, "injector": 1}
    # unknown work, or no room at all: min_size (Ray Data scales up within its budget)
    assert initial_pool_sizes(pools, None, {"CPU": 64.0}) == {"sampler": 1, "injector": 1}
    assert initial_pool_sizes(pools, 96, {}) == {"sampler": 1, "injector": 1}
    # GPU pools are held to the free GPUs, and growth goes round the pools in pipeline order
    gpu = PoolConfig(min_size=1, max_size=4, num_cpus=1.0, num_gpus=1.0)
    judge = PoolConfig(min_size=1, max_size=4, num_cpus=1.0, num_gpus=0.5)
    assert initial_pool_sizes([("sampler", gpu), ("judge", judge)], 96, {"CPU": 32.0, "GPU": 3.0}) == \
        {"sampler": 2, "judge": 2}


def test_image_loading_fuses_into_cpu_actor_pools_only():
    """Equal remote arguments let Ray Data fuse load_images into the first image stage's actor
    call (no task per group); before a GPU pool it stays a task stage of io_num_cpus."""
    from bpo_ray.config import load_config
    from bpo_ray.config.generate import PoolConfig
    from bpo_ray.generate.pipeline import image_loading_args

    cfg = load_config("tiny", [])
    env = {"env_vars": {"X": "1"}}
    cpu = PoolConfig(min_size=1, max_size=2, num_cpus=0.5, batch_size=8)
    assert image_loading_args(cfg, cpu, env) == {"num_cpus": 0.5, "runtime_env": env}
    gpu = PoolConfig(num_cpus=1, num_gpus=1)
    assert image_loading_args(cfg, gpu, None) == {"num_cpus": cfg.generate.io_num_cpus}
    assert image_loading_args(cfg, PoolConfig(num_cpus=0.5, max_restarts=3), None) == \
        {"num_cpus": cfg.generate.io_num_cpus}
    assert image_loading_args(cfg, None, None) == {"num_cpus": cfg.generate.io_num_cpus}


def test_pair_building_tasks_are_capped_and_kept_out_of_the_plan(ray_cluster):
    """``generate.outcome_tasks`` caps the build_outcomes tasks in flight (1 by default): each
    further one makes Ray start a worker process (~1 CPU-s) while the model stages need the CPUs
    (docs/generate.md, session 22). The tasks carry the stage workers' runtime env, so they can run
    in a worker an earlier stage started. A runtime setting: a resumed run may change it."""
    from bpo_ray.config import load_config
    from bpo_ray.generate.ingest import SourceIndex
    from bpo_ray.generate.pipeline import _plan, generation_stages
    from bpo_ray.raycluster import worker_runtime_env

    for n in (1, 3):
        cfg = load_config("tiny", ["generate.strategies=[image_weakened]", f"generate.outcome_tasks={n}"])
        last = generation_stages(ray_cluster.data.from_items([{"a": 1}]), cfg)._logical_plan.dag
        assert last.name == "MapBatches(build_outcomes)"
        assert last.compute.size == n
        assert last.ray_remote_args["runtime_env"] == worker_runtime_env(cfg.numerics)
    assert load_config("tiny", []).generate.outcome_tasks == 1
    with pytest.raises(Exception, match="outcome_tasks"):
        load_config("tiny", ["generate.outcome_tasks=0"])
    index = SourceIndex(source="s.jsonl", files=["s.jsonl"], chunks=[], chunk_items=[], chunk_lines=[],
                        chunk_sha256=[], n_source_items=0, keep=None, n_items=0, chunk_bytes=1 << 23,
                        max_text_chars=20000)
    plans = [_plan(load_config("tiny", [f"generate.outcome_tasks={n}"]), "s.jsonl", None, index) for n in (1, 4)]
    assert plans[0] == plans[1] and "outcome_tasks" not in plans[0]["generate"]


def test_pair_building_batches_stay_within_a_shard():
    from bpo_ray.config import load_config
    from bpo_ray.generate.pipeline import outcome_batch_rows

    def rows(shard: int, batch: int) -> int:
        return outcome_batch_rows(load_config("tiny", ["generate.strategies=[image_weakened]",
                                                       f"generate.shard_size={shard}",
                                                       f"generate.sampler.pool.batch_size={batch}"]))

    assert rows(4, 1) == 4      # a shard commits as soon as its rows are built
    assert rows(16, 8) == 16
    assert rows(1000, 8) == 64  # capped
    assert rows(4, 8) == 8      # never below a generation group
