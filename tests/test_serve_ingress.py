"""``serve.ingress=haproxy`` end to end: ``bpo-ray serve --app judge`` in its own process starts a
fresh local Ray with Serve's HAProxy ingress (HAProxy on ``serve.port``, straight to the replica's
own HTTP server) and the judge proxy answers there: a miss, then a hit, with the proxy's own time
in ``Server-Timing``; Ctrl-C deletes the app.

A separate Ray instance because the switch is read once, when Ray's processes start.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port
from serve_support import FlakyUpstream

from bpo_ray.serving.timing import server_ms

pytestmark = pytest.mark.slow

TOKENS_ENV = "BPO_TEST_INGRESS_TOKENS"


def test_judge_behind_haproxy_ingress(tmp_path):
    token = "tok-dave-" + secrets.token_hex(12)
    port, fallback = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({TOKENS_ENV: f"dave:{token}", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback)})
    with FlakyUpstream(failures=0) as upstream:
        sets = [f"serve.port={port}", "serve.ingress=haproxy", f"serve.judge.upstream_base_url={upstream.base_url}",
                "serve.judge.upstream_model=gpt-4", f"serve.judge.client_tokens_env={TOKENS_ENV}",
                "serve.judge.upstream_key_env=BPO_TEST_INGRESS_NO_KEY",
                f"serve.judge.cache_path={tmp_path / 'j.sqlite'}", "ray.num_cpus=2"]
        cmd = [sys.executable, "-m", "bpo_ray.serving.cli", "--config", "tiny", "--app", "judge"]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = None
            deadline = time.time() + 240
            lines = []
            while url is None and time.time() < deadline:
                line = proc.stdout.readline()
                assert line or proc.poll() is None, "bpo-ray serve exited:\n" + "".join(lines)
                lines.append(line)
                if line.startswith("judge proxy: "):
                    url = line.split()[2].rsplit("/chat/completions", 1)[0]
            assert url == f"http://127.0.0.1:{port}/judge/v1", "".join(lines)

            body = {"model": "gpt-4", "temperature": 0, "messages": [{"role": "user", "content": "Is snow white?"}]}
            auth = {"Authorization": f"Bearer {token}"}
            answers = [httpx.post(url + "/chat/completions", json=body, headers=auth, timeout=60) for _ in range(3)]
            assert [a.status_code for a in answers] == [200, 200, 200], answers[0].text
            assert [a.headers["x-bpo-cache"] for a in answers] == ["miss", "hit", "hit"]
            assert answers[1].content == answers[2].content and upstream.calls == 1
            assert answers[0].json()["choices"] == answers[2].json()["choices"]
            assert server_ms(answers[2].headers.get("server-timing")) is not None
            assert httpx.post(url + "/chat/completions", json=body, timeout=60).status_code == 401
            # Serve's own HTTP proxy runs beside HAProxy, on the fallback port, in front of the same replica
            behind_serve_proxy = httpx.post(f"http://127.0.0.1:{fallback}/judge/v1/chat/completions", json=body,
                                            headers=auth, timeout=60)
            assert behind_serve_proxy.headers["x-bpo-cache"] == "hit"
            assert behind_serve_proxy.headers["x-bpo-replica"] == answers[2].headers["x-bpo-replica"]
            assert httpx.get(url + "/usage", headers=auth, timeout=60).json()["usage"]["cache_hits"] == 3
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        assert proc.returncode == 0, out
        assert "stopping" in out
