"""Serve stage end to end on a real local Ray cluster: the model app (transformers backend, a real
LoRA adapter) and the judge proxy, driven with the official ``openai`` client over HTTP.

Secrets are this test's own random values, handed to the Serve replicas only through the
environment they inherit (set here at import time, before the session's ``ray.init``).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from conftest import free_port, wait_for
from serve_support import FlakyUpstream, data_url, hf_reference, image_messages, make_lora_adapter, random_image

pytestmark = pytest.mark.slow

TOKENS_ENV = "BPO_TEST_SERVE_JUDGE_TOKENS"
UPSTREAM_KEY_ENV = "BPO_TEST_SERVE_UPSTREAM_KEY"
ALICE_TOKEN = "tok-alice-" + secrets.token_hex(12)
BOB_TOKEN = "tok-bob-" + secrets.token_hex(12)
UPSTREAM_KEY = "sk-upstream-" + secrets.token_hex(16)
WRONG_TOKEN = "tok-wrong-" + secrets.token_hex(12)
os.environ[TOKENS_ENV] = f"alice:{ALICE_TOKEN},bob:{BOB_TOKEN}"
os.environ[UPSTREAM_KEY_ENV] = UPSTREAM_KEY

QUESTION = "Describe the image in detail."
MAX_TOKENS = 12
SEEN_RESPONSES: list[str] = []  # every response body, checked for secrets at the end


@dataclass
class Stack:
    port: int
    model_url: str
    judge_url: str
    flaky_judge_url: str
    flaky: FlakyUpstream
    mllm: str
    adapter: str
    cfg: object


@pytest.fixture(scope="module")
def stack(ray_cluster, tiny_models, tmp_path_factory):
    from ray import serve

    from bpo_ray.config import load_config
    from bpo_ray.serving.apps import judge_application, with_adapters
    from bpo_ray.serving.deploy import start_serving

    tmp = tmp_path_factory.mktemp("serve")
    adapter = make_lora_adapter(tiny_models["mllm"], tmp / "sharp")
    port = free_port()
    model_url = f"http://127.0.0.1:{port}/v1"
    cfg = with_adapters(load_config("tiny", [
        f"models.mllm={tiny_models['mllm']}", f"serve.port={port}",
        "serve.model.max_tokens=32", "serve.model.max_prompt_tokens=200", "serve.model.max_image_bytes=8192",
        f"serve.judge.upstream_base_url={model_url}", "serve.judge.upstream_model=base",
        f"serve.judge.upstream_key_env={UPSTREAM_KEY_ENV}", f"serve.judge.client_tokens_env={TOKENS_ENV}",
        f"serve.judge.cache_path={tmp / 'judge.sqlite'}", "serve.judge.retry_backoff_s=0.05",
    ]), {"sharp": adapter})
    urls = start_serving(cfg)
    flaky = FlakyUpstream(failures=2).__enter__()
    flaky_cfg = cfg.model_copy(deep=True)
    flaky_cfg.serve.judge.upstream_base_url = flaky.base_url
    flaky_cfg.serve.judge.upstream_model = "gpt-4"
    flaky_cfg.serve.judge.rate_limit_per_minute = 2
    flaky_cfg.serve.judge.max_retries = 3
    flaky_cfg.serve.judge.cache_path = str(tmp / "flaky.sqlite")
    serve.run(judge_application(flaky_cfg), name="judge-flaky", route_prefix="/judge-flaky/v1")
    yield Stack(port, urls.model, urls.judge, f"http://127.0.0.1:{port}/judge-flaky/v1", flaky,
                tiny_models["mllm"], adapter, cfg)
    serve.shutdown()  # deletes this module's apps and frees the cluster for other stages' tests
    flaky.__exit__()


def model_client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.model_url, api_key="unused", max_retries=0, timeout=60)


def judge_client(url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=60)


def ask(client: openai.OpenAI, model: str, seed: int = 0, **kw) -> str:
    resp = client.chat.completions.create(model=model, messages=image_messages(QUESTION, data_url(random_image(seed))),
                                          max_tokens=MAX_TOKENS, temperature=0, **kw)
    SEEN_RESPONSES.append(resp.model_dump_json())
    return resp.choices[0].message.content


# --- model app ---------------------------------------------------------------------------------

def test_models_lists_base_and_adapters(stack):
    assert [m.id for m in model_client(stack).models.list().data] == ["base", "sharp"]


def test_image_in_text_out_matches_transformers(stack):
    client = model_client(stack)
    resp = client.chat.completions.create(model="base", messages=image_messages(QUESTION, data_url(random_image(0))),
                                          max_tokens=MAX_TOKENS, temperature=0)
    text = resp.choices[0].message.content
    assert text and text == hf_reference(stack.mllm, random_image(0), QUESTION, MAX_TOKENS)
    assert resp.usage.prompt_tokens > 16  # 16 image tokens + the prompt
    assert resp.usage.completion_tokens <= MAX_TOKENS
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert ask(client, "base", seed=3) != text  # the image matters


def test_adapter_by_name_differs_from_base_and_matches_peft(stack):
    client = model_client(stack)
    base, sharp = ask(client, "base"), ask(client, "sharp")
    assert sharp != base
    assert sharp == hf_reference(stack.mllm, random_image(0), QUESTION, MAX_TOKENS, adapter_dir=stack.adapter)


def test_streaming_sends_openai_chunks(stack):
    client = model_client(stack)
    for model in ("base", "sharp"):
        chunks = list(client.chat.completions.create(
            model=model, messages=image_messages(QUESTION, data_url(random_image(0))), max_tokens=MAX_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2, "tokens arrive as several chunks"
        assert "".join(pieces) == ask(client, model)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 16
        assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_concurrent_mixed_adapters_each_get_their_own_answer(stack):
    client = model_client(stack)
    expected = {"base": ask(client, "base"), "sharp": ask(client, "sharp")}
    models = ["base", "sharp"] * 4
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda m: ask(client, m), models))
    assert got == [expected[m] for m in models]


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "ModelServer" not in status.deployments:
        return 0
    return int(status.deployments["ModelServer"].replica_states.get("RUNNING", 0))


def test_model_replicas_autoscale_from_config_under_load(stack):
    """``serve.model.autoscaling`` drives Serve's real autoscaler: one replica at rest, a second one
    while 6 clients keep more requests in flight than the target, back to one when they stop.
    The delays are shortened from Ray's defaults (30 s up, 600 s down) so this takes seconds."""
    import threading

    from ray import serve

    from bpo_ray.config.serve import AutoscalingConfig
    from bpo_ray.serving.apps import model_application

    cfg = stack.cfg.model_copy(deep=True)
    cfg.serve.model.route_prefix = "/scaling/v1"
    cfg.serve.model.num_cpus = 0.25
    cfg.serve.model.max_batch_size = 1  # requests queue on the replica instead of sharing one generate
    cfg.serve.model.autoscaling = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                                                    upscale_delay_s=0, downscale_delay_s=1, look_back_period_s=1)
    serve.run(model_application(cfg), name="scaling", route_prefix="/scaling/v1")
    try:
        assert _running_replicas("scaling") == 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/scaling/v1", api_key="unused",
                               max_retries=0, timeout=60)
        expected = ask(client, "base")
        stop, answers = threading.Event(), []

        def load() -> None:
            while not stop.is_set():
                answers.append(ask(client, "base"))

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: _running_replicas("scaling") == 2, 90, "a second replica under load")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert answers and set(answers) == {expected}  # every answer, on either replica, is the same greedy text
        wait_for(lambda: _running_replicas("scaling") == 1, 90, "one replica again at rest")
    finally:
        serve.delete("scaling")


def _png_bytes(size: int) -> bytes:
    buf = io.BytesIO()
    random_image(1, size).save(buf, format="PNG")
    return buf.getvalue()


def _b64_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _chat(content, **extra) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def _img(url: str) -> list:
    return [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]


BAD_REQUESTS = {
    "malformed_json": (b'{"model": "base", "messages": [', 400, "invalid_json"),
    "bad_base64": (_chat(_img("data:image/png;base64,@@not-base64@@")), 400, "bad_base64"),
    "not_an_image": (_chat(_img(_b64_url(b"hello, I am text"))), 400, "unreadable_image"),
    "image_too_large": (_chat(_img(_b64_url(_png_bytes(96)))), 400, "image_too_large"),
    "remote_url_refused": (_chat(_img("http://127.0.0.1:1/x.png")), 400, "bad_image_url"),
    "two_images": (_chat(_img(data_url(random_image(0))) + _img(data_url(random_image(1)))), 400, "too_many_images"),
    "max_tokens_over_limit": (_chat("hi", max_tokens=10_000), 400, "max_tokens_too_large"),
    "prompt_too_long": (_chat("word " * 400), 400, "context_length_exceeded"),
    "unknown_model": ({**_chat("hi"), "model": "no-such-adapter"}, 404, "model_not_found"),
    "no_messages": ({"model": "base", "messages": []}, 400, "invalid_request"),
    "ends_with_assistant": ({"model": "base", "messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "yo"}]},
                            400, "invalid_messages"),
    "body_too_large": (b"x" * (9 * 1024 * 1024), 413, "request_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_clear_4xx_and_server_keeps_serving(stack, case):
    body, status, code = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(stack.model_url + "/chat/completions", content=content,
                      headers={"Content-Type": "application/json"}, timeout=60)
    SEEN_RESPONSES.append(resp.text)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert ask(model_client(stack), "base")  # still serving


# --- judge proxy --------------------------------------------------------------------------------

JUDGE_MESSAGES = [{"role": "system", "content": "You are a strict grader."},
                  {"role": "user", "content": "Is a red cup red? Answer yes or no."}]


def _usage(url: str, token: str) -> dict:
    resp = httpx.get(url + "/usage", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    SEEN_RESPONSES.append(resp.text)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_judge_answers_repeats_from_cache_without_upstream_call(stack):
    client = judge_client(stack.judge_url, ALICE_TOKEN)
    before = _usage(stack.judge_url, ALICE_TOKEN)["usage"]
    first = client.chat.completions.with_raw_response.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=8,
                                                             temperature=0, seed=7)
    second = client.chat.completions.with_raw_response.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=8,
                                                              temperature=0, seed=7)
    a, b = first.parse(), second.parse()
    SEEN_RESPONSES.extend([a.model_dump_json(), b.model_dump_json()])
    assert (first.headers["x-bpo-cache"], second.headers["x-bpo-cache"]) == ("miss", "hit")
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.model == "base"  # judge.upstream_model: the model app answered
    after = _usage(stack.judge_url, ALICE_TOKEN)
    delta = {k: after["usage"][k] - before[k] for k in ("requests", "cache_hits", "upstream_requests",
                                                         "upstream_attempts")}
    assert delta == {"requests": 2, "cache_hits": 1, "upstream_requests": 1, "upstream_attempts": 1}
    assert after["usage"]["prompt_tokens"] - before["prompt_tokens"] == a.usage.prompt_tokens
    assert after["usage"]["saved_usd"] > before["saved_usd"]
    assert after["cache_entries"] >= 1
    # a sampled request (temperature > 0, no seed) is not deterministic: it goes upstream each time
    client.chat.completions.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=4, temperature=0.7)
    client.chat.completions.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=4, temperature=0.7)
    assert _usage(stack.judge_url, ALICE_TOKEN)["usage"]["upstream_requests"] == after["usage"]["upstream_requests"] + 2


def test_judge_cache_persists_on_disk(stack):
    from bpo_ray.serving.judge.cache import JudgeCache

    cache = JudgeCache(stack.cfg.serve.judge.cache_path)
    try:
        assert len(cache) >= 1
    finally:
        cache.close()


@pytest.mark.parametrize("token", [None, WRONG_TOKEN])
def test_judge_refuses_missing_or_wrong_token(stack, token):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps({"model": "gpt-4", "messages": JUDGE_MESSAGES, "temperature": 0}).encode()
    resp = httpx.post(stack.judge_url + "/chat/completions", content=body, headers=headers, timeout=30)
    SEEN_RESPONSES.append(resp.text)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == ("invalid_token" if token else "missing_token")
    if token:
        with pytest.raises(openai.AuthenticationError):
            judge_client(stack.judge_url, token).chat.completions.create(model="gpt-4", messages=JUDGE_MESSAGES)
    assert httpx.get(stack.judge_url + "/usage", headers=headers).status_code == 401
    assert judge_client(stack.judge_url, BOB_TOKEN).chat.completions.create(
        model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=4, temperature=0).choices  # still serving


@pytest.mark.parametrize("body,code", [(b"{nope", "invalid_json"), (b'{"model": "gpt-4"}', "invalid_request"),
                                       (b'{"messages": [{"role": "user", "content": "x"}], "stream": true}',
                                        "stream_unsupported")])
def test_judge_bad_request_gets_clear_4xx(stack, body, code):
    resp = httpx.post(stack.judge_url + "/chat/completions", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {ALICE_TOKEN}", "Content-Type": "application/json"})
    SEEN_RESPONSES.append(resp.text)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == code


def test_judge_retries_failing_upstream_then_rate_limits(stack):
    client = judge_client(stack.flaky_judge_url, BOB_TOKEN)
    resp = client.chat.completions.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=8, temperature=0)
    SEEN_RESPONSES.append(resp.model_dump_json())
    assert resp.choices[0].message.content == "verdict 3"  # 503, 503, then 200
    assert stack.flaky.calls == 3
    assert stack.flaky.auth_headers == [f"Bearer {UPSTREAM_KEY}"] * 3  # the server's key, never the client's
    usage = _usage(stack.flaky_judge_url, BOB_TOKEN)["usage"]
    assert (usage["upstream_attempts"], usage["retries"], usage["prompt_tokens"]) == (3, 2, 100)
    assert usage["cost_usd"] == pytest.approx(100 / 1000 * 0.03 + 10 / 1000 * 0.06)
    # rate limit 2/minute on upstream-bound requests: a second new request passes, a third is refused
    client.chat.completions.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=8, temperature=0.5)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=8, temperature=0.5)
    assert info.value.response.headers.get("retry-after")
    # cached answers are not rate limited
    again = client.chat.completions.create(model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == "verdict 3" and stack.flaky.calls == 4
    # another client has its own budget
    assert judge_client(stack.flaky_judge_url, ALICE_TOKEN).chat.completions.create(
        model="gpt-4", messages=JUDGE_MESSAGES, max_tokens=8, temperature=0.5).choices


# --- CLI, config file, secrets ------------------------------------------------------------------

def test_cli_deploys_adapter_given_on_command_line(stack, capsys):
    from bpo_ray.serving.cli import main

    overrides = [f"models.mllm={stack.mllm}", f"serve.port={stack.port}", "serve.model.max_tokens=32"]
    args = ["--config", "tiny", "--app", "model", "--detach", "--adapter", f"crisp={stack.adapter}"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{stack.port}/v1" in out and "crisp" in out
    client = model_client(stack)
    assert [m.id for m in client.models.list().data] == ["base", "crisp"]
    assert ask(client, "crisp") == hf_reference(stack.mllm, random_image(0), QUESTION, MAX_TOKENS,
                                                adapter_dir=stack.adapter)


def test_cli_refuses_bad_adapter_argument(capsys):
    from bpo_ray.serving.cli import main

    with pytest.raises(SystemExit):
        main(["--adapter", "no-equals-sign"])
    assert "NAME=DIR_OR_URI" in capsys.readouterr().err
    assert main(["--adapter", "bad.name=/tmp/x", "--set", "models.mllm=/nonexistent"]) == 2
    assert "adapter name 'bad.name'" in capsys.readouterr().err


def test_serve_config_file_builds_both_apps(tiny_models):
    from ray.serve.schema import ServeDeploySchema

    from bpo_ray.serving.apps import build_judge_app, build_model_app

    spec = ServeDeploySchema.model_validate(yaml.safe_load(Path("serve/config.yaml").read_text()))
    assert {a.name: a.route_prefix for a in spec.applications} == {"model": "/v1", "judge": "/judge/v1"}
    builders = {"bpo_ray.serving.apps:build_model_app": build_model_app,
                "bpo_ray.serving.apps:build_judge_app": build_judge_app}
    for app in spec.applications:
        args = {**app.args, "overrides": [f"models.mllm={tiny_models['mllm']}"]}
        built = builders[app.import_path](args)
        assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown app args"):
        build_model_app({"confg": "tiny"})


def test_no_secret_in_logs_or_responses(stack):
    import ray

    secrets_ = [ALICE_TOKEN, BOB_TOKEN, UPSTREAM_KEY, WRONG_TOKEN]
    assert SEEN_RESPONSES, "earlier tests recorded responses"
    for text in SEEN_RESPONSES:
        assert not any(s in text for s in secrets_)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("serve" in str(p) for p in files)
    for path in files:
        data = path.read_bytes()
        for s in secrets_:
            assert s.encode() not in data, f"secret found in {path}"
