"""SteerLM attributes on the served endpoint (seed 002): the official ``openai`` client sends the
desired HelpSteer attributes as ``extra_body={"steer_attributes": {...}}``; the server writes them
into the prompt exactly as ``steerlm_rows`` trained it (``bpo_ray.models.steerlm.steer_prompt``).

The model app runs without Ray here (``bpo_ray.serving.standalone``: the same OpenAI app and
request validator as the Ray Serve deployment, a real transformers backend, uvicorn on loopback).
"""

from __future__ import annotations

import openai
import pytest

from bpo_ray.models.prompts import build_prompt
from bpo_ray.models.steerlm import steer_prompt
from serve_support import data_url, image_messages, random_image
from tests.serve_support import AppServer as Server

pytestmark = pytest.mark.slow
QUESTION = "Describe the image in detail."
MAX_TOKENS = 10
ATTRS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 0}


def greedy(mllm_dir: str, prompt: str, image) -> str:
    """What transformers answers greedily in-process for ``prompt``."""
    from bpo_ray.models.loading import load_mllm

    model, proc = load_mllm(mllm_dir, device="cpu")
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = proc.tokenizer.eos_token_id
    ids = ids[:ids.index(eos)] if eos in ids else ids
    return proc.tokenizer.decode(ids, skip_special_tokens=True)


def test_steer_attributes_reach_the_prompt_over_openai(tiny_models):
    from bpo_ray.config import load_config
    from bpo_ray.serving.standalone import create_standalone_app

    cfg = load_config("tiny", [f"models.mllm={tiny_models['mllm']}", "models.device=cpu",
                               "serve.model.max_tokens=32", "serve.model.max_prompt_tokens=200"])
    image = random_image(5)
    with Server(create_standalone_app(cfg)) as url:
        client = openai.OpenAI(base_url=f"{url}{cfg.serve.model.route_prefix}", api_key="unused", max_retries=0)

        def chat(**kw):
            return client.chat.completions.create(model="base", messages=image_messages(QUESTION, data_url(image)),
                                                  max_tokens=MAX_TOKENS, temperature=0, **kw)

        plain, steered = chat(), chat(extra_body={"steer_attributes": ATTRS})
        other = chat(extra_body={"steer_attributes": {**ATTRS, "verbosity": 4}})
        # the attribute line costs prompt tokens, and the answers are the steered prompts' answers
        assert steered.usage.prompt_tokens > plain.usage.prompt_tokens
        assert other.usage.prompt_tokens == steered.usage.prompt_tokens
        expected = greedy(tiny_models["mllm"], steer_prompt(build_prompt(QUESTION), ATTRS), image)
        assert steered.choices[0].message.content == expected
        assert plain.choices[0].message.content == greedy(tiny_models["mllm"], build_prompt(QUESTION), image)
        assert other.choices[0].message.content == greedy(
            tiny_models["mllm"], steer_prompt(build_prompt(QUESTION), {**ATTRS, "verbosity": 4}), image)

        for bad, why in (({k: v for k, v in ATTRS.items() if k != "verbosity"}, "missing ['verbosity']"),
                         ({**ATTRS, "verbosity": 7}, "verbosity=7 is not an integer in 0-4"),
                         ({**ATTRS, "humor": 1}, "unknown ['humor']")):
            with pytest.raises(openai.BadRequestError) as info:
                chat(extra_body={"steer_attributes": bad})
            assert why in str(info.value) and info.value.body["param"] == "steer_attributes"
        assert chat().choices[0].message.content == plain.choices[0].message.content  # still serving
