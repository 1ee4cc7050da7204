"""Helpers for the on-policy tests: a real OpenAI-compatible claim judge on loopback that answers
``CLAIM_TEMPLATE`` from each image's objects, and the project's judge proxy in front of it."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping

from PIL import Image

from conftest import free_port, wait_for

_CLAIM = re.compile(r"^Is there an? (.+) in the image\? Answer yes or no\.$")


def pixels_key(img: Image.Image) -> str:
    """An image's identity as the judge sees it: its RGB pixels (a PNG re-encode keeps them)."""
    rgb = img.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


class ClaimJudge:
    """OpenAI-compatible ``/v1/chat/completions`` answering "Yes."/"No." to one object claim about
    the attached image, from ``objects`` (pixels key -> object names).

    ``mode``: ``ok``; ``garbage`` (an unusable "Maybe."); ``error`` (HTTP 500). Unknown images
    get 400. ``claims`` records every (pixels key, object) asked.
    """

    def __init__(self, objects: Mapping[str, set[str]], mode: str = "ok"):
        self.objects = dict(objects)
        self.mode = mode
        self.claims: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.mode == "error":
                    return self._send(500, {"error": {"message": "upstream down"}})
                parts = body["messages"][-1]["content"]
                text = next(p["text"] for p in parts if p["type"] == "text")
                url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
                img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                key = pixels_key(img)
                m = _CLAIM.match(text)
                if not m or key not in server.objects:
                    return self._send(400, {"error": {"message": f"bad claim or unknown image: {text!r}"}})
                with server.lock:
                    server.claims.append((key, m.group(1)))
                reply = "Maybe." if server.mode == "garbage" else (
                    "Yes." if m.group(1) in server.objects[key] else "No, there is not.")
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": reply}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class JudgeProxyServer:
    """The project's judge proxy (``create_judge_app``) under uvicorn on loopback, forwarding to
    ``upstream``; clients authenticate with the token in env var ``tokens_env``."""

    def __init__(self, upstream: str, cache_path: str, tokens_env: str, upstream_key_env: str = "UNUSED_UPSTREAM_KEY"):
        import uvicorn

        from bpo_ray.config.serve import JudgeProxyConfig
        from bpo_ray.serving.judge.proxy import create_judge_app

        cfg = JudgeProxyConfig(upstream_base_url=upstream, upstream_model="claim-judge", cache_path=cache_path,
                               client_tokens_env=tokens_env, upstream_key_env=upstream_key_env,
                               max_retries=0, retry_backoff_s=0.0, rate_limit_per_minute=100000)
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_judge_app(cfg, prefix="/judge/v1"), host="127.0.0.1",
                                                    port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "judge proxy start")
        self.url = f"http://127.0.0.1:{port}/judge/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        time.sleep(0.1)
