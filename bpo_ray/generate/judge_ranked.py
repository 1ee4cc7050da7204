"""Judge-ranked pairs (Li et al. 2024, section 3.1-3.2): sample N answers, have a judge score them,
pair the best with a clearly worse one.

Following Li et al. 2024: N completions per prompt are sampled from the MLLM (temperature 0.7); a judge
rates each for helpfulness, correctness and coherence (HelpSteer's 0-4 scale); the aggregate is
their sum; the preferred answer is the top-scoring one and the rejected one is drawn at random
among those at least ``min_score_gap`` points lower. The judge is any OpenAI-compatible
endpoint (the project's judge proxy, vLLM, OpenAI); its key comes from the environment only.

The judge is asked the way section 3.1 describes (HelpSteer's labelling guide, zero-shot
chain-of-thought: reasoning for each response, then its ratings) for all five HelpSteer attributes
(helpfulness, correctness, coherence, complexity, verbosity). Every rated completion is kept as a
row of the annotation dataset (``OUT/annotations/*.parquet``, ``bpo_ray.schemas.ANNOTATION_SCHEMA``);
the pair is derived from those rows (``choose_pair``), and ``bpo_ray.generate.annotations`` derives
the same pairs, and the SFT sets of rejection sampling and SteerLM, from the stored dataset.
A reply without usable ratings is asked again up to ``parse_retries`` times (counted as
``judge.retry``); transport failures are retried by the ``openai`` client (``max_retries``); an
item whose judge never answers usably is quarantined (``judge_unparsable`` / ``judge_error``).
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
from bpo_ray.schemas import HELPSTEER_ATTRIBUTES
from bpo_ray.serving.judge.client import CLIENT_TOKEN_ENV, judge_client

STRATEGY = "judge_ranked"
COLUMN = f"neg_{STRATEGY}"
METRICS = ("helpfulness", "correctness", "coherence")  # summed into Li et al. 2024's aggregate
ATTRIBUTES = HELPSTEER_ATTRIBUTES                        # all five are rated and stored
MAX_SCORE = 4.0

JUDGE_SYSTEM = "You are a careful annotator rating answers about an image."
JUDGE_TEMPLATE = """Rate each response to the question about the image on five attributes, each an integer from 0 (lowest) to 4 (highest), following the HelpSteer annotation guidelines:
- helpfulness: how well the response fully addresses the question's request.
- correctness: is the information accurate and relevant to the image, free of errors, misinformation or hallucinated content?
- coherence: is the response clear and logically consistent, without repetition or contradictions?
- complexity: the sophistication of the language and structure, from simple words (0) to expert-level prose (4).
- verbosity: how long the response is relative to what the question needs, from terse (0) to very long (4).
A reference answer written by a human annotator who saw the image is given; use it to judge correctness.

[Question]
{question}
[End of question]

[Reference answer]
{reference}
[End of reference answer]

{responses}

Think step by step: for each response, write your reasoning, calibrate the ratings against the other responses, then end your reply with one line of JSON exactly like
{{"scores": [{{"reasoning": "...", "helpfulness": 0, "correctness": 0, "coherence": 0, "complexity": 0, "verbosity": 0}}, ...]}}
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
    complexity: Optional[float] = None
    verbosity: Optional[float] = None
    reasoning: str = ""

    @property
    def total(self) -> float:
        """Li et al. 2024's aggregate: the sum of helpfulness, correctness and coherence."""
        return self.helpfulness + self.correctness + self.coherence

    def ratings(self) -> dict[str, Optional[float]]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def judge_messages(question: str, reference: str, responses: Sequence[str],
                   image_data_url: Optional[str] = None) -> list[dict[str, Any]]:
    listed = "\n\n".join(f"[Response {i + 1}]\n{r}\n[End of Response {i + 1}]" for i, r in enumerate(responses))
    text = JUDGE_TEMPLATE.format(question=question, reference=reference, responses=listed, n=len(responses))
    content: Any = text
    if image_data_url:
        content = [{"type": "image_url", "image_url": {"url": image_data_url}}, {"type": "text", "text": text}]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


_SCORES_START = re.compile(r"\{\s*\"scores\"\s*:")


def parse_scores(reply: str, n: int, attributes: Sequence[str] = METRICS) -> list[JudgeScore]:
    """The last ``{"scores": [...]}`` object in ``reply``: exactly ``n`` entries, each of
    ``attributes`` a number in 0-4. An entry's ``"reasoning"`` string (optional) is kept; without
    one, the text before the JSON (the judge's step-by-step monologue) stands in for it."""
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown or not set(METRICS) <= set(attributes):
        raise ValueError(f"attributes must include {METRICS} and be among {ATTRIBUTES}, got {attributes}")
    decoder = json.JSONDecoder()
    for m in reversed(list(_SCORES_START.finditer(reply or ""))):
        try:
            obj, _ = decoder.raw_decode(reply, m.start())
        except json.JSONDecodeError:
            continue
        entries = obj.get("scores")
        if not isinstance(entries, list) or len(entries) != n:
            raise JudgeError("judge_unparsable", f"expected {n} scores, got {entries!r:.200}")
        monologue = reply[:m.start()].strip()
        scores = []
        for e in entries:
            if not isinstance(e, dict):
                raise JudgeError("judge_unparsable", f"score entry {e!r:.100} is not an object")
            vals = {}
            for k in attributes:
                v = e.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_SCORE:
                    raise JudgeError("judge_unparsable", f"{k}={v!r} is not a number in 0-{MAX_SCORE:g}")
                vals[k] = float(v)
            why = e.get("reasoning")
            scores.append(JudgeScore(**vals, reasoning=why.strip() if isinstance(why, str) and why.strip()
                                     else monologue))
        return scores
    raise JudgeError("judge_unparsable", "no {\"scores\": [...]} object in the reply")


def choose_pair(totals: Sequence[float], min_gap: float, seed: int,
                draw: str = "among_worse") -> Optional[tuple[int, int]]:
    """``(best, rejected)`` indices, or ``None`` when there is no pair.

    The best is the top total (first on ties). ``draw="among_worse"``: a seeded random choice among
    the answers at least ``min_gap`` below it. ``draw="any_other"`` (Li et al. 2024 section 3.2 read
    literally): a seeded random choice among all other answers, the pair kept only when the gap
    is at least ``min_gap``.
    """
    if draw not in ("among_worse", "any_other"):
        raise ValueError(f"draw must be 'among_worse' or 'any_other', got {draw!r}")
    if len(totals) < 2:
        return None
    best = max(range(len(totals)), key=lambda i: (totals[i], -i))
    if draw == "any_other":
        other = random.Random(seed).choice([i for i in range(len(totals)) if i != best])
        return (best, other) if totals[best] - totals[other] >= min_gap else None
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
              image_data_url: Optional[str] = None, attributes: Sequence[str] = METRICS) -> list[JudgeScore]:
        return self.score_with_retries(question, reference, responses, image_data_url, attributes)[0]

    def score_with_retries(self, question: str, reference: str, responses: Sequence[str],
                           image_data_url: Optional[str] = None, attributes: Sequence[str] = METRICS,
                           parse_retries: int = 0) -> tuple[list[JudgeScore], int]:
        """Scores and how many times an unusable reply was asked again (at most ``parse_retries``)."""
        import openai

        messages = judge_messages(question, reference, responses, image_data_url)
        for attempt in range(parse_retries + 1):
            try:
                reply = self.client.chat.completions.create(model=self.model, temperature=0, messages=messages)
            except openai.OpenAIError as exc:
                raise JudgeError("judge_error", type(exc).__name__) from exc
            text = reply.choices[0].message.content if reply.choices else ""
            try:
                return parse_scores(text or "", len(responses), attributes), attempt
            except JudgeError:
                if attempt == parse_retries:
                    raise
        raise AssertionError("unreachable")


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
        return self.runner.sample_answers(
            rows, images, {i: str(batch["llava_prompt"][i]) for i in rows}, n, self.sampling,
            lambda i, k: sampling_seed(self.seed, STRATEGY, str(batch["item_id"][i]), k))

    def _rank(self, batch, i: int, image, samples: list[tuple[str, int]]) -> dict[str, Any]:
        texts = [t for t, _ in samples]
        url = to_data_url(image) if self.cfg.send_image else None
        try:
            scores, retries = self.judge.score_with_retries(str(batch["question"][i]), str(batch["answer"][i]),
                                                            texts, url, ATTRIBUTES, self.cfg.parse_retries)
        except JudgeError as exc:
            return {"failed": exc.reason}
        annotations = [{"completion_index": k, "completion": text, **s.ratings(), "reasoning": s.reasoning,
                        "seed": seed} for k, (s, (text, seed)) in enumerate(zip(scores, samples))]
        extra = {"annotations": annotations, "judge_model": self.cfg.judge_model, "generator": self.model_uri,
                 "annotation_sampling": self.provenance, "judge_retries": retries}
        totals = [s.total for s in scores]
        pick = choose_pair(totals, self.cfg.min_score_gap, derive_seed(self.seed, "pick", str(batch["item_id"][i])),
                           self.cfg.draw)
        if pick is None:
            return {"filtered": "no_score_gap", **extra}
        best, worse = pick
        return {"chosen": texts[best], "text": texts[worse], "noise_step": None, "seed": samples[worse][1],
                "sampling": {**self.provenance, "chosen_score": totals[best], "rejected_score": totals[worse],
                             "scores": totals}, **extra}
