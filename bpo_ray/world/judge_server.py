"""The world's annotator as an OpenAI-compatible judge upstream on loopback (FastAPI + uvicorn).

    bpo-ray world judge --world runs/demo/world --port 8100
    bpo-ray serve --config tiny --set serve.judge.upstream_base_url=http://127.0.0.1:8100/v1

The judge proxy (``bpo_ray.serving.judge.proxy``) forwards to it exactly as it would to GPT-4:
``POST /v1/chat/completions`` answers with a chat completion whose text is
``bpo_ray.world.annotator.answer_prompt``'s reply, ``GET /v1/models`` lists
``bias-world-annotator``. Images in a request (``image_url`` parts, ``data:`` URLs) are looked up
by the SHA-256 of their decoded RGB pixels in an index of every scene of the world directory, so
the hash does not depend on how the client re-encoded the PNG. ``usage`` counts whitespace-separated
words of the prompt and the reply as tokens (what the proxy prices and reports).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bpo_ray.world.annotator import ANNOTATOR_MODEL, UnknownImage, UnknownPrompt, answer_prompt
from bpo_ray.world.grading import SceneTruth

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def pixel_sha256(image) -> str:
    """SHA-256 of an image's size and RGB pixels (independent of the file's encoding)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()


class SceneIndex:
    """Pixel hash -> scene truth (kind -> (colour, positions)) for every scene of a world dir."""

    def __init__(self, world_dir: str):
        from PIL import Image

        root = Path(world_dir).expanduser().resolve()
        world_json = root / "world.json"
        if not world_json.exists():
            raise FileNotFoundError(f"no bias world at {root} (world.json missing): run `bpo-ray world build` first")
        files = json.loads(world_json.read_text()).get("files", {})
        scenes_file = root / files.get("scenes", "scenes.jsonl")
        self.root = root
        self.scenes: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {}
        self.missing_images = 0
        for line in scenes_file.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            path = root / record["image"]
            if not path.exists():
                self.missing_images += 1
                continue
            truth: dict[str, tuple[str, tuple[str, ...]]] = {}
            for obj in record["objects"]:
                colour, positions = truth.get(obj["kind"], (obj["colour"], ()))
                truth[obj["kind"]] = (colour, positions + (obj["position"],))
            with Image.open(path) as img:
                self.scenes[pixel_sha256(img)] = truth
        if not self.scenes:
            raise FileNotFoundError(f"{scenes_file}: no scene with an image on disk")

    def __len__(self) -> int:
        return len(self.scenes)

    def scene_of_data_url(self, url: str) -> SceneTruth:
        from bpo_ray.images import ImageError, decode_data_url

        try:
            image = decode_data_url(url)
        except ImageError as exc:
            raise UnknownImage(f"image_url is not a decodable data: URL ({exc})") from None
        scene = self.scenes.get(pixel_sha256(image))
        if scene is None:
            raise UnknownImage("the image is not a scene of this world")
        return scene


def _user_text_and_image(messages: Any) -> tuple[str, Optional[str]]:
    """Text of the last user message and the first image URL in it."""
    if not isinstance(messages, list):
        raise UnknownPrompt("messages must be a list")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise UnknownPrompt("no user message")
    content = user[-1].get("content")
    if isinstance(content, str):
        return content, None
    texts, image = [], None
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif part.get("type") == "image_url" and image is None:
            url = part.get("image_url")
            image = url.get("url") if isinstance(url, dict) else url
    return "\n".join(texts), image


def completion(text: str, model: str, prompt: str) -> dict[str, Any]:
    prompt_tokens, completion_tokens = len(prompt.split()), len(text.split())
    return {"id": "chatcmpl-world-" + hashlib.sha256((prompt + text).encode()).hexdigest()[:16],
            "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def create_app(index: SceneIndex):
    """The FastAPI app; errors use OpenAI's ``{"error": {...}}`` shape."""
    app = FastAPI(title="bias-world annotator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.counts = {}

    def error(status: int, message: str, code: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return error(400, "request body must be a JSON object", "invalid_request")
        try:
            text, image = _user_text_and_image(body.get("messages"))
            reply = answer_prompt(text, (lambda: index.scene_of_data_url(image)) if image else None)
        except UnknownImage as exc:
            return error(400, str(exc), "unknown_image")
        except UnknownPrompt as exc:
            return error(400, str(exc), "unknown_prompt")
        app.state.counts[reply.protocol] = app.state.counts.get(reply.protocol, 0) + 1
        return completion(reply.text, str(body.get("model") or ANNOTATOR_MODEL), text)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": ANNOTATOR_MODEL, "object": "model", "owned_by": "bias-world"}]}

    @app.get("/v1/stats")
    async def stats():
        return {"scenes": len(index), "answered": dict(app.state.counts)}

    return app


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bpo-ray world judge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, help="bias-world directory (world.json, scenes.jsonl, images/)")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8100)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.host not in LOOPBACK:
        print(f"bpo-ray world judge: --host {args.host} is not a loopback address; the annotator binds to "
              "loopback only (put the judge proxy in front of it)", file=sys.stderr)
        return 2
    try:
        index = SceneIndex(args.world)
    except FileNotFoundError as exc:
        print(f"bpo-ray world judge: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"world annotator: http://{args.host}:{args.port}/v1/chat/completions ({len(index)} scenes)", flush=True)
    uvicorn.run(create_app(index), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
