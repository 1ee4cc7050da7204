"""The generate stage (BPO section 3.1): bootstrap negatives and write preference pairs.

Modules, one job each: ``sources`` (records -> items, quarantine reasons), ``image_loader``
(image validation stage), ``backends`` (MLLM generation from embeddings: transformers or vLLM),
``image_weakened`` (noised-embedding sampler), ``error_injection`` (Table 1 prompt on the text
LLM), ``judge_ranked`` (Li et al. 2024's judge-scored pairs), ``pairs`` (filters, pair rows, outcomes),
``shards`` (resumable atomic output), ``pipeline`` (the Ray Data job), ``cli``.
"""

__all__ = ["run_generate"]


def __getattr__(name: str):
    if name == "run_generate":  # lazy: importing a small module here should not import Ray and torch
        from bpo_ray.generate.pipeline import run_generate

        return run_generate
    raise AttributeError(name)
