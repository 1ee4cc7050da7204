"""The serve stage: the tuned model and the judge proxy as Ray Serve applications.

- ``apps``: ``build_model_app`` / ``build_judge_app`` (Serve config import paths).
- ``deploy``: ``start_serving(cfg)`` / ``stop_serving()``; ``cli``: ``bpo-ray serve``.
- ``model_app``: autoscaled ``ModelServer`` replicas, each FastAPI routes (``openai_app``) over a
  backend (``backends``: vLLM or transformers + peft, LoRA adapters by model name).
- ``judge_proxy``: OpenAI-compatible proxy with auth, cache, limits, retries, accounting;
  ``judge_client``: the client helper other stages use.
- ``standalone``: the same model API in one uvicorn process (benchmark baseline).
"""
