"""The train stage: LoRA DPO (BPO paper Eq. 4 and variants) or SFT on preference pairs with Ray
Train + DeepSpeed ZeRO, and the reference pass that precomputes reference log-probs.

Modules: ``losses`` (the objectives), ``logprobs`` (answer-token log-probs, one concatenated
forward), ``data`` (pairs: validation, order, encoding), ``lora`` (adapter, reference = adapter
off), ``zero`` (DeepSpeed configs), ``loop`` (the per-worker loop), ``trainer`` (the Ray Train
driver), ``reference`` (the Ray Data reference pass), ``plots``, ``export``; ``cli`` and
``reference_cli`` are the ``bpo-ray train`` / ``bpo-ray reference`` commands.
"""
