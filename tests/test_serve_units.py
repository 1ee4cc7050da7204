"""Serve-stage building blocks without a cluster: prompt folding, stop strings, incremental
decoding, token auth, the judge cache, the rate limiter, redaction, config validation."""

from __future__ import annotations

import pytest

from bpo_ray.models.prompts import build_prompt
from bpo_ray.serving.backends.base import IncrementalDecoder, StopTrimmer, trim_at_stop
from bpo_ray.serving.chat_input import conversation_from_messages, llava_prompt
from bpo_ray.serving.errors import APIError
from bpo_ray.serving.judge.auth import ClientAuth, parse_client_tokens
from bpo_ray.serving.judge.cache import JudgeCache, cache_key, is_deterministic
from bpo_ray.serving.judge.limits import SlidingWindowLimiter
from bpo_ray.serving.judge.upstream import redact
from bpo_ray.serving.protocol import ChatMessage


def _msgs(*pairs) -> list[ChatMessage]:
    return [ChatMessage.model_validate({"role": r, "content": c}) for r, c in pairs]


def test_messages_fold_into_llava_turns():
    conv = conversation_from_messages(_msgs(
        ("system", "Be brief."),
        ("user", [{"type": "text", "text": "What is <image> here?"},
                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
        ("assistant", "A cup."), ("user", "Which colour?"), ("user", "One word.")))
    assert conv.image_urls == ("data:image/png;base64,AAAA",)
    assert conv.history == (("Be brief.\nWhat is  here?", "A cup."),)
    assert conv.question == "Which colour?\nOne word."
    assert llava_prompt(conv, with_image=True) == build_prompt("Which colour?\nOne word.", conv.history)
    assert llava_prompt(conv, with_image=True).count("<image>") == 1
    assert "<image>" not in llava_prompt(conv, with_image=False)


@pytest.mark.parametrize("pairs,code", [
    ((("assistant", "hi"), ("user", "x")), "invalid_messages"),
    ((("user", "x"), ("assistant", "y")), "invalid_messages"),
    ((("assistant", [{"type": "image_url", "image_url": {"url": "data:,"}}]), ("user", "x")), "invalid_content"),
])
def test_bad_conversations_are_refused(pairs, code):
    with pytest.raises(APIError) as info:
        conversation_from_messages(_msgs(*pairs))
    assert info.value.status == 400 and info.value.code == code


def test_stop_trimmer_holds_back_partial_stop_strings():
    t = StopTrimmer(["END"])
    out = "".join(t.push(p) for p in ["hello E", "N", "xx E", "ND more"]) + t.flush()
    assert out == "hello ENxx " and t.stopped
    assert trim_at_stop("abc", []) == ("abc", False)
    assert trim_at_stop("a. b. c", ["b.", "c"]) == ("a. ", True)


def test_incremental_decoder_equals_one_shot_decode(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["mllm"])
    ids = tok("There is a red cup on the left. Ünïcödé ✓")["input_ids"] + [5, 6, 7]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in ids] + [dec.finish()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert sum(1 for p in pieces if p) > 3


def test_client_tokens_and_constant_time_auth():
    assert parse_client_tokens("alice:t1, bob:t2") == {"t1": "alice", "t2": "bob"}
    assert parse_client_tokens("t1,,t2") == {"t1": "client-1", "t2": "client-2"}
    auth = ClientAuth(parse_client_tokens("alice:secret-a,bob:secret-b"))
    assert auth.authenticate("Bearer secret-b") == "bob"
    for header, code in ((None, "missing_token"), ("Basic secret-a", "missing_token"), ("Bearer nope", "invalid_token")):
        with pytest.raises(APIError) as info:
            auth.authenticate(header)
        assert info.value.status == 401 and info.value.code == code and "secret" not in info.value.message
    with pytest.raises(APIError, match="no client tokens"):
        ClientAuth({}).authenticate("Bearer x")


def test_cache_key_is_canonical_and_cache_persists(tmp_path):
    a = {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "temperature": 0, "user": "u1"}
    b = {"temperature": 0, "user": "u2", "messages": [{"content": "x", "role": "user"}], "model": "gpt-4"}
    assert cache_key(a, "https://up/v1") == cache_key(b, "https://up/v1")
    assert cache_key(a, "https://up/v1") != cache_key({**a, "max_tokens": 5}, "https://up/v1")
    assert cache_key(a, "https://up/v1") != cache_key(a, "https://other/v1")
    assert is_deterministic(a) and is_deterministic({"temperature": 0.7, "seed": 1})
    assert not is_deterministic({"temperature": 0.7}) and not is_deterministic({}) and not is_deterministic(
        {"temperature": 0, "n": 2})
    path = str(tmp_path / "c.sqlite")
    cache = JudgeCache(path)
    cache.put("k", {"choices": [], "usage": {"prompt_tokens": 3}})
    cache.close()
    again = JudgeCache(path)
    assert again.get("k") == {"choices": [], "usage": {"prompt_tokens": 3}} and again.get("other") is None
    again.close()


def test_rate_limiter_window():
    now = [0.0]
    lim = SlidingWindowLimiter(2, clock=lambda: now[0])
    assert lim.admit("a") is None and lim.admit("a") is None
    assert lim.admit("a") == pytest.approx(60.0)
    assert lim.admit("b") is None  # per client
    now[0] = 60.0
    assert lim.admit("a") is None


def test_redact_removes_secrets_and_key_shapes():
    text = "Incorrect API key provided: sk-abc123XYZ789. token my-client-token rejected"
    out = redact(text, ["my-client-token"])
    assert "sk-abc123" not in out and "my-client-token" not in out and "Incorrect API key" in out


def test_serve_config_validates_adapter_names_and_replicas():
    from bpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="adapter name 'a.b'"):
        load_config("tiny", ["serve.model.adapters={a.b: /x}"])
    with pytest.raises(ConfigError, match="is the base model's served_name"):
        load_config("tiny", ["serve.model.adapters={base: /x}"])
    with pytest.raises(ConfigError, match="min_replicas 3 > max_replicas 1"):
        load_config("tiny", ["serve.model.autoscaling.min_replicas=3"])



def _serve_files(files: dict[str, bytes]):
    """A real HTTP server on loopback serving ``files`` by path (404 otherwise)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_remote_image_urls_load_only_where_configured(s3_server):
    """``serve.model.allow_remote_images``: http(s):// and s3:// image URLs decode to the same pixels
    as the data URL; missing or oversized remote images are 400s; off (the default), they are refused."""
    import asyncio
    import io

    import numpy as np

    from bpo_ray import storage
    from bpo_ray.serving.chat_input import ChatValidator, ModelLimits
    from serve_support import data_url, random_image

    buf = io.BytesIO()
    random_image(4, 32).save(buf, format="PNG")
    png = buf.getvalue()
    storage.write_bytes(f"{s3_server['root']}/serve-images/cat.png", png)
    server = _serve_files({"/cat.png": png, "/big.png": png + b"\0" * 4096})
    http = f"http://127.0.0.1:{server.server_address[1]}"

    def validator(allow: bool, max_bytes: int = 4096) -> ChatValidator:
        limits = ModelLimits(max_tokens=16, max_prompt_tokens=200, context_length=512, image_seq_length=16,
                             max_image_bytes=max_bytes, allow_remote_images=allow, remote_image_timeout_s=5)
        return ChatValidator(None, limits, "base", [])

    def load(v: ChatValidator, url: str) -> np.ndarray:
        return asyncio.run(v.load_image(url))

    try:
        on, off = validator(True), validator(False)
        want = load(off, data_url(random_image(4, 32)))
        assert want.shape == (32, 32, 3)
        assert np.array_equal(load(on, f"{http}/cat.png"), want)
        assert np.array_equal(load(on, f"{s3_server['root']}/serve-images/cat.png"), want)
        for v, url, code in [
            (on, f"{http}/missing.png", "missing_image"),
            (on, f"{http}/big.png", "image_too_large"),
            (on, f"{s3_server['root']}/serve-images/missing.png", "missing_image"),
            (on, "ftp://127.0.0.1/cat.png", "bad_image_url"),
            (off, f"{http}/cat.png", "bad_image_url"),
            (off, f"{s3_server['root']}/serve-images/cat.png", "bad_image_url"),
        ]:
            with pytest.raises(APIError) as err:
                load(v, url)
            assert (err.value.status, err.value.code) == (400, code), url
    finally:
        server.shutdown()
