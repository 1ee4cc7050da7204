"""Judge-ranked pairs (Li et al. 2024, section 3.1-3.2): sample N answers, have a judge score them,
pair the best with a clearly worse one.

Following Li et al. 2024: N completions per prompt are sampled from the MLLM (temperature 0.7); a judge
rates each for helpfulness, correctness and coherence (HelpSteer's 0-4 scale); the aggregate is
their sum; the preferred answer is the top-scoring one and the rejected one is drawn at random
among those at least ``min_score_gap`` points lower. The judge is any OpenAI-compatible
endpoint (the project's judge proxy, vLLM, OpenAI); its key comes from the environment only.
"""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from bpo_ray import numerics
from bpo_ray.config.generate import JudgeRankedConfig, SamplingConfig
from bpo_ray.generate.backends import MLLMRunner, worker_env_defaults
from bpo_ray.generate.rows import decoded_batch, rows_by_group, sampling_record, with_column
from bpo_ray.generate.seeds import derive_seed, sampling_seed
from bpo_ray.images import to_data_url
from bpo_ray.serving.judge.client import CLIENT_TOKEN_ENV, judge_client

STRATEGY = "judge_ranked"
COLUMN = f"neg_{STRATEGY}"
METRICS = ("helpfulness", "correctness", "coherence")
MAX_SCORE = 4.0

JUDGE_SYSTEM = "You are a careful annotator rating answers about an image."
JUDGE_TEMPLATE = """Rate each response to the question about the image on three metrics, each an integer from 0 (worst) to 4 (best):
- helpfulness: does the response fully address the question's request?
- correctness: is the information accurate and relevant to the image, free of errors or hallucinated content?
- coherence: is the response clear and logically consistent?
A reference answer written by a human annotator who saw the image is given; use it to judge correctness.

[Question]
{question}
[End of question]

[Reference answer]
{reference}
[End of reference answer]

{responses}

Think step by step about each response, then end your reply with one line of JSON exactly like
{{"scores": [{{"helpfulness": 0, "correctness": 0, "coherence": 0}}, ...]}}
with one object per response, in order ({n} objects)."""


class JudgeError(RuntimeError):
    """The judge could not be reached or its reply had no usable scores; ``reason`` says which."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class JudgeScore:
    helpfulness: float
    correctness: float
    coherence: float

    @property
    def total(self) -> float:
        """Li et al. 2024's aggregate: the sum of helpfulness, correctness and coherence."""
        return self.helpfulness + self.correctness + self.coherence


def judge_messages(question: str, reference: str, responses: Sequence[str],
                   image_data_url: Optional[str] = None) -> list[dict[str, Any]]:
    listed = "\n\n".join(f"[Response {i + 1}]\n{r}\n[End of Response {i + 1}]" for i, r in enumerate(responses))
    text = JUDGE_TEMPLATE.format(question=question, reference=reference, responses=listed, n=len(responses))
    content: Any = text
    if image_data_url:
        content = [{"type": "image_url", "image_url": {"url": image_data_url}}, {"type": "text", "text": text}]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


_SCORES_START = re.compile(r"\{\s*\"scores\"\s*:")


def parse_scores(reply: str, n: int) -> list[JudgeScore]:
    """The last ``{"scores": [...]}`` object in ``reply``: exactly ``n`` entries, each metric in 0-4."""
    decoder = json.JSONDecoder()
    for m in reversed(list(_SCORES_START.finditer(reply or ""))):
        try:
            obj, _ = decoder.raw_decode(reply, m.start())
        except json.JSONDecodeError:
            continue
        entries = obj.get("scores")
        if not isinstance(entries, list) or len(entries) != n:
            raise JudgeError("judge_unparsable", f"expected {n} scores, got {entries!r:.200}")
        scores = []
        for e in entries:
            if not isinstance(e, dict):
                raise JudgeError("judge_unparsable", f"score entry {e!r:.100} is not an object")
            vals = []
            for k in METRICS:
                v = e.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_SCORE:
                    raise JudgeError("judge_unparsable", f"{k}={v!r} is not a number in 0-{MAX_SCORE:g}")
                vals.append(float(v))
            scores.append(JudgeScore(*vals))
        return scores
    raise JudgeError("judge_unparsable", "no {\"scores\": [...]} object in the reply")


def choose_pair(totals: Sequence[float], min_gap: float, seed: int) -> Optional[tuple[int, int]]:
    """``(best, rejected)`` indices: the top total (first on ties) and a seeded random choice among
    answers at least ``min_gap`` below it; ``None`` when no answer is clearly worse."""
    if len(totals) < 2:
        return None
    best = max(range(len(totals)), key=lambda i: (totals[i], -i))
    worse = [i for i in range(len(totals)) if i != best and totals[best] - totals[i] >= min_gap]
    if not worse:
        return None
    return best, random.Random(seed).choice(worse)


class JudgeClient:
    """Scores answers through the judge proxy (or any OpenAI-compatible endpoint), with the
    project's one judge client: the proxy's own token from ``$token_env``, never the upstream key."""

    def __init__(self, base_url: str, model: str, token_env: str = CLIENT_TOKEN_ENV,
                 timeout_s: float = 60.0, max_retries: int = 3):
        self.client = judge_client(base_url, token_env=token_env, timeout_s=timeout_s, max_retries=max_retries)
        self.model = model

    def score(self, question: str, reference: str, responses: Sequence[str],
              image_data_url: Optional[str] = None) -> list[JudgeScore]:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model, temperature=0,
                messages=judge_messages(question, reference, responses, image_data_url))
        except openai.OpenAIError as exc:
            raise JudgeError("judge_error", type(exc).__name__) from exc
        text = reply.choices[0].message.content if reply.choices else ""
        return parse_scores(text or "", len(responses))


class JudgeRankedSampler:
    """Adds ``neg_judge_ranked``: for each usable row, at most one (best, clearly worse) pair."""

    def __init__(self, model_uri: str, backend: str, judge: dict, seed: int, dtype: str = "float32",
                 device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models",
                 engine_kwargs: Optional[dict] = None, drop_image_bytes: bool = False, cpu_isa: str = "native"):
        numerics.check(cpu_isa, where="judge-ranked sampler")
        worker_env_defaults()
        self.cfg = JudgeRankedConfig(**judge)
        if not self.cfg.judge_url:
            raise ValueError("generate.judge_ranked.judge_url is not set (an OpenAI-compatible base URL)")
        self.sampling: SamplingConfig = self.cfg.sampling
        self.seed = int(seed)
        self.model_uri = model_uri
        self.drop = ("image_bytes",) if drop_image_bytes else ()
        self.runner = MLLMRunner(model_uri, backend=backend, dtype=dtype, device=device,
                                 cache_dir=cache_dir, engine_kwargs=engine_kwargs)
        self.judge = JudgeClient(self.cfg.judge_url, self.cfg.judge_model, self.cfg.judge_token_env,
                                 self.cfg.timeout_s, self.cfg.max_retries)
        self.provenance = sampling_record(backend, self.sampling, judge_model=self.cfg.judge_model,
                                          num_samples=self.cfg.num_samples, min_score_gap=self.cfg.min_score_gap)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images, rows, negatives = decoded_batch(batch)
        samples: dict[int, list[tuple[str, int]]] = {}
        for group in rows_by_group(batch, rows):
            samples.update(self._sample(batch, group, images, negatives))
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda i: (i, self._rank(batch, i, images[i], samples[i])), samples))
        for i, neg in results:
            negatives[i] = [neg]
        return with_column(batch, COLUMN, negatives, drop=self.drop)

    def _sample(self, batch, rows, images, negatives) -> dict[int, list[tuple[str, int]]]:
        """Row -> N sampled (text, seed) answers from the clean image."""
        n = self.cfg.num_samples
        prompts = [str(batch["llava_prompt"][i]) for i in rows]
        if not rows:
            return {}
        encoded = self.runner.encode([images[i] for i in rows], prompts)
        lengths = self.runner.prompt_lengths(encoded)
        fit = [k for k, ln in enumerate(lengths) if ln + self.sampling.max_new_tokens <= self.runner.max_len]
        for k in set(range(len(rows))) - set(fit):
            negatives[rows[k]] = [{"failed": "prompt_too_long"}]
        rows = [rows[k] for k in fit]
        if not rows:
            return {}
        prompts = [str(batch["llava_prompt"][i]) for i in rows]
        rep_rows = [i for i in rows for _ in range(n)]
        rep_prompts = [p for p in prompts for _ in range(n)]
        encoded = self.runner.encode([images[i] for i in rep_rows], rep_prompts)
        seeds = [sampling_seed(self.seed, STRATEGY, str(batch["item_id"][i]), k) for i in rows for k in range(n)]
        feats = self.runner.features(encoded["pixel_values"])
        outs = self.runner.generate(rep_prompts, encoded, feats, self.sampling, seeds)
        samples: dict[int, list[tuple[str, int]]] = {i: [] for i in rows}
        for i, s, gen in zip(rep_rows, seeds, outs):
            samples[i].append((gen.text, s))
        return samples

    def _rank(self, batch, i: int, image, samples: list[tuple[str, int]]) -> dict[str, Any]:
        texts = [t for t, _ in samples]
        url = to_data_url(image) if self.cfg.send_image else None
        try:
            scores = self.judge.score(str(batch["question"][i]), str(batch["answer"][i]), texts, url)
        except JudgeError as exc:
            return {"failed": exc.reason}
        totals = [s.total for s in scores]
        pick = choose_pair(totals, self.cfg.min_score_gap, derive_seed(self.seed, "pick", str(batch["item_id"][i])))
        if pick is None:
            return {"filtered": "no_score_gap"}
        best, worse = pick
        return {"chosen": texts[best], "text": texts[worse], "noise_step": None, "seed": samples[worse][1],
                "generator": self.model_uri,
                "sampling": {**self.provenance, "chosen_score": totals[best], "rejected_score": totals[worse],
                             "scores": totals}}
