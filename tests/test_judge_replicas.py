"""Two judge proxy replicas on a real Ray Serve share one cache and one usage ledger: a request
answered upstream by one replica is a hit on the other, racing misses end with one answer per
key, and ``/usage`` counts both replicas' requests whichever one answers it.

The token reaches the replicas only through the environment they inherit (set at import time,
before the session's ``ray.init``), as in tests/test_serve.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import secrets

import httpx
import pytest

from conftest import free_port
from serve_support import FlakyUpstream

pytestmark = pytest.mark.slow

TOKENS_ENV = "BPO_TEST_JUDGE_REPLICAS_TOKENS"
TOKEN = "tok-carol-" + secrets.token_hex(12)
os.environ[TOKENS_ENV] = f"carol:{TOKEN}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def judge2(ray_cluster, tmp_path_factory):
    from ray import serve

    from bpo_ray.config.serve import JudgeProxyConfig
    from bpo_ray.serving.judge.proxy import build_judge_application

    upstream = FlakyUpstream(failures=0).__enter__()
    cfg = JudgeProxyConfig(upstream_base_url=upstream.base_url, upstream_model="gpt-4", client_tokens_env=TOKENS_ENV,
                           upstream_key_env="BPO_TEST_JUDGE_REPLICAS_NO_KEY", num_replicas=2,
                           cache_path=str(tmp_path_factory.mktemp("judge2") / "judge.sqlite"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_judge_application(cfg), name="judge-two", route_prefix="/judge2/v1")
    yield f"http://127.0.0.1:{port}/judge2/v1", upstream
    serve.shutdown()
    upstream.__exit__()


def ask(url: str, question: str) -> httpx.Response:
    body = {"model": "gpt-4", "temperature": 0, "messages": [{"role": "user", "content": question}]}
    resp = httpx.post(url + "/chat/completions", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp


def usage(url: str) -> dict:
    resp = httpx.get(url + "/usage", headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_hit_is_served_by_the_other_replica(judge2):
    url, upstream = judge2
    before = upstream.calls
    first = ask(url, "Is a red cup red?")
    assert first.headers["x-bpo-cache"] == "miss" and upstream.calls == before + 1
    stored_by, answered = first.headers["x-bpo-replica"], 1
    other = None
    for _ in range(60):  # Serve spreads requests over both replicas
        again = ask(url, "Is a red cup red?")
        answered += 1
        assert again.headers["x-bpo-cache"] == "hit" and again.json() == first.json()
        if again.headers["x-bpo-replica"] != stored_by:
            other = again
            break
    assert other is not None, "every request went to one replica"
    assert upstream.calls == before + 1
    # the ledger is shared too: each replica reports both replicas' requests
    reports = [usage(url) for _ in range(6)]
    assert all(r["usage"] == reports[0]["usage"] for r in reports)
    counted = reports[0]["usage"]
    assert (counted["requests"], counted["cache_hits"], counted["upstream_requests"]) == (answered, answered - 1, 1)
    assert counted["saved_usd"] == pytest.approx((answered - 1) * (100 / 1000 * 0.03 + 10 / 1000 * 0.06))


def test_racing_misses_on_both_replicas_give_one_answer(judge2):
    url, upstream = judge2
    before = upstream.calls
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(url, "Is a blue cup red?"), range(8)))
    assert len({a.content for a in answers}) == 1  # one value for the key, whoever called upstream
    assert 1 <= upstream.calls - before <= 2  # at most one upstream call per replica
    assert ask(url, "Is a blue cup red?").content == answers[0].content
