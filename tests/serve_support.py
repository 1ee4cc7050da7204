"""Helpers shared by the serve-stage tests: a real LoRA adapter, HF reference answers, images,
and a real (flaky) OpenAI-compatible upstream on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from bpo_ray.images import to_data_url
from bpo_ray.models.prompts import build_prompt

LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_lora_adapter(mllm_dir: str, out: Path, seed: int = 1, rank: int = 8) -> str:
    """A PEFT LoRA adapter on the tiny LLaVA's language-model linear layers, with random (non-zero)
    B so the adapted model answers differently from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bpo_ray.models.loading import load_mllm

    model, _ = load_mllm(mllm_dir, device="cpu")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LM_LINEAR,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    return str(out)


def random_image(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def image_messages(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def hf_reference(mllm_dir: str, image: Image.Image, question: str, max_tokens: int,
                 adapter_dir: Optional[str] = None) -> str:
    """What transformers (+ peft) answers greedily in-process, for comparing with the server."""
    from bpo_ray.models.loading import load_mllm

    model, proc = load_mllm(mllm_dir, device="cpu")
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    inputs = proc(images=image, text=build_prompt(question), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = proc.tokenizer.eos_token_id
    ids = ids[:ids.index(eos)] if eos in ids else ids
    return proc.tokenizer.decode(ids, skip_special_tokens=True)


class FlakyUpstream:
    """A real HTTP server speaking OpenAI chat completions: answers 503 ``failures`` times, then 200.

    Records the Authorization header of every call so tests can check what the proxy sent."""

    def __init__(self, failures: int = 2):
        self.failures = failures
        self.calls = 0
        self.auth_headers: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                owner.calls += 1
                owner.auth_headers.append(self.headers.get("Authorization", ""))
                if owner.calls <= owner.failures:
                    payload, status = {"error": {"message": "overloaded", "type": "server_error"}}, 503
                else:
                    payload, status = {
                        "id": f"chatcmpl-{owner.calls}", "object": "chat.completion", "created": 0,
                        "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": f"verdict {owner.calls}"}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                    }, 200
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyUpstream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def data_url(img: Image.Image) -> str:
    return to_data_url(img)


class AppServer:
    """An ASGI app under uvicorn in a daemon thread on a free loopback port; ``with`` gives its URL
    (plus ``suffix``, e.g. ``/v1``)."""

    def __init__(self, app, suffix: str = "", log_level: str = "warning"):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.suffix = suffix
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start within 30 s"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}{self.suffix}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
