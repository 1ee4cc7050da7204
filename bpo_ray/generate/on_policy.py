"""On-policy, verifier-labelled preference pairs (RLAIF-V; SENTINEL, ICCV 2025; OPA-DPO).

Both answers of a pair come from the policy itself (the base MLLM or a trained LoRA adapter),
sampled on the clean image; a verifier (``bpo_ray.generate.verifiers``) decides, object mention by
object mention, what is grounded. Off-policy chosen answers (the dataset's ground truth) are
unlikely under the policy, and plain DPO then lowers their log-probability and the fluency with
it (docs/science.md); on-policy pairs avoid that (OPA-DPO, Yang et al., CVPR 2025).

Two pair levels:

- ``sentence`` (SENTINEL's context-aware preference, the default): among the K samples, the first
  with a hallucinated sentence gives the shared grounded prefix (its sentences before that one)
  and the rejected side; ``num_continuations`` answers are sampled from ``prompt + prefix`` and the
  first fully grounded one that names at least one real object is chosen. The prefix goes into the
  pair's ``prompt`` (after ``ASSISTANT:``), so training conditions both answers on it and never
  scores it. ``span`` says how much is compared: ``sentence`` (the next sentence only, as SENTINEL)
  or ``to_end`` (the rest of the answer, so both sides end where the model stopped; the default,
  because training appends ``</s>`` to every answer and one-sentence answers would teach stopping).
- ``response`` (RLAIF-V's ranking by rejected claims): the sample with the fewest hallucinated
  objects (then most grounded ones) that names a real object against the one with the most, at
  least ``min_gap`` more.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from bpo_ray import numerics
from bpo_ray.config.generate import OnPolicyConfig, SamplingConfig
from bpo_ray.metrics.chair import MentionExtractor, ObjectMentionExtractor
from bpo_ray.generate.backends import MLLMRunner, worker_env_defaults
from bpo_ray.generate.pairs import normalise
from bpo_ray.generate.rows import decoded_batch, rows_by_group, sampling_record, with_column
from bpo_ray.generate.seeds import sampling_seed
from bpo_ray.generate.sentences import (SentenceVerdict, apply_verdicts, first_hallucinated, is_grounded_answer,
                                        join_sentences, sentence_objects)
from bpo_ray.generate.verifiers import ObjectVerifier, VerifierError, VerifyItem, load_annotations, make_verifier
from bpo_ray.models.prompts import continuation_prompt

STRATEGY = "on_policy"
COLUMN = f"neg_{STRATEGY}"


@dataclass
class Sample:
    """One sampled answer, its seed and its per-sentence verdicts."""

    text: str
    seed: int
    verdicts: list[SentenceVerdict]

    @property
    def hallucinated(self) -> int:
        return sum(v.hallucinated_objects for v in self.verdicts)

    @property
    def grounded(self) -> int:
        return sum(v.grounded_objects for v in self.verdicts)


def verify_text(text: str, item: VerifyItem, extractor: MentionExtractor, verifier: ObjectVerifier) -> list[SentenceVerdict]:
    """Sentences of ``text`` with the verifier's verdict for every object they mention."""
    sentences = sentence_objects(text, extractor)
    objects = list(dict.fromkeys(o for _, objs in sentences for o in objs))
    return apply_verdicts(sentences, verifier.verify(item, objects) if objects else {})


def response_pair(samples: Sequence[Sample], min_gap: int) -> Union[tuple[int, int], str]:
    """``(chosen, rejected)`` sample indices, or the filter reason.

    Chosen: fewest hallucinated objects, then most grounded, then first; it must name at least one
    grounded object and repeat no sentence. Rejected: most hallucinated objects (first on ties), at least ``min_gap`` more.
    """
    usable = [i for i, s in enumerate(samples)
              if s.grounded > 0 and not repeats_sentence([v.text for v in s.verdicts])]
    if not usable:
        return "no_grounded_sample"
    best = min(usable, key=lambda i: (samples[i].hallucinated, -samples[i].grounded, i))
    worst = max(range(len(samples)), key=lambda i: (samples[i].hallucinated, -i))
    if samples[worst].hallucinated - samples[best].hallucinated < min_gap:
        return "no_grounding_gap"
    return best, worst


def sentence_target(samples: Sequence[Sample]) -> Optional[tuple[int, int]]:
    """``(sample, sentence)``: the first sample with a hallucinated sentence and that sentence."""
    for k, s in enumerate(samples):
        cut = first_hallucinated(s.verdicts)
        if cut is not None:
            return k, cut
    return None


def repeats_sentence(sentences: Sequence[str], context: Sequence[str] = ()) -> bool:
    """True when a sentence repeats one before it (in ``context`` or earlier in ``sentences``),
    up to case, spacing and punctuation. Repeating a grounded sentence is the cheapest way to be
    "grounded", and a policy trained to prefer it learns to repeat itself (measured on the bias
    world: well-formed captions fell 3 points), so such answers are never chosen."""
    seen = {normalise(s) for s in context}
    for s in sentences:
        key = normalise(s)
        if key in seen:
            return True
        seen.add(key)
    return False


def pick_continuation(continuations: Sequence[Sample], span: str, prefix: Sequence[str] = ()) -> Optional[int]:
    """Index of the first usable grounded continuation, or ``None``.

    ``span == "sentence"``: its first sentence names objects, all confirmed; ``"to_end"``: no
    rejected object anywhere and at least one confirmed one. Either way, the compared sentences
    repeat none of the ``prefix`` nor each other.
    """
    for j, c in enumerate(continuations):
        if span == "sentence":
            v = c.verdicts[:1]
            ok = bool(v) and not v[0].hallucinated and v[0].grounded_objects > 0
        else:
            v = c.verdicts
            ok = is_grounded_answer(v)
        if ok and not repeats_sentence([x.text for x in v], prefix):
            return j
    return None


def _verdicts_json(verdicts: Sequence[SentenceVerdict]) -> list:
    return [v.as_json() for v in verdicts]


class OnPolicySampler:
    """Adds ``neg_on_policy``: per usable row at most one verifier-labelled pair (``chosen``,
    ``text`` = rejected, ``prompt`` with the shared prefix), or ``filtered`` / ``failed``."""

    def __init__(self, model_uri: str, backend: str, on_policy: dict, synonyms: dict[str, str], seed: int,
                 dtype: str = "float32", device: str = "auto", cache_dir: str = "~/.cache/bpo-ray/models",
                 engine_kwargs: Optional[dict] = None, drop_image_bytes: bool = False, cpu_isa: str = "native"):
        numerics.check(cpu_isa, where="on-policy sampler")
        worker_env_defaults()
        self.cfg = OnPolicyConfig(**on_policy)
        self.sampling: SamplingConfig = self.cfg.sampling
        self.seed = int(seed)
        self.drop = ("image_bytes",) if drop_image_bytes else ()
        self.generator = model_uri if not self.cfg.adapter else f"{model_uri}+{self.cfg.adapter}"
        load_uri = model_uri
        if self.cfg.adapter:
            load_uri = self._merged(model_uri, self.cfg.adapter, dtype, cache_dir)
        self.runner = MLLMRunner(load_uri, backend=backend, dtype=dtype, device=device, cache_dir=cache_dir,
                                 engine_kwargs=engine_kwargs)
        self.extractor = ObjectMentionExtractor(synonyms)
        v = self.cfg.verifier
        table = load_annotations(v.annotations, v.annotations_format) if v.annotations else None
        self.verifier = make_verifier(v, self.extractor, table)
        self.provenance = sampling_record(
            backend, self.sampling, verifier=self.verifier.name, pair_level=self.cfg.pair_level, span=self.cfg.span,
            num_samples=self.cfg.num_samples, num_continuations=self.cfg.num_continuations,
            min_gap=self.cfg.min_gap, adapter=self.cfg.adapter)

    @staticmethod
    def _merged(model_uri: str, adapter: str, dtype: str, cache_dir: str) -> str:
        """The policy = base + adapter, merged once per actor into a local checkpoint that both
        backends load (vLLM then needs no LoRA support for the vision model)."""
        from bpo_ray.train.export import export_merged

        out = tempfile.mkdtemp(prefix="bpo-onpolicy-policy-")
        export_merged(model_uri, adapter, out, dtype=dtype, cache_dir=cache_dir)
        return out

    # ------------------------------------------------------------------ stage
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images, rows, negatives = decoded_batch(batch)
        wanted = self.cfg.item_sources
        if wanted is not None:
            for i in [i for i in rows if str(batch["source"][i]) not in wanted]:
                negatives[i] = [{"filtered": "source_not_selected"}]
            rows = [i for i in rows if str(batch["source"][i]) in wanted]
        for group in rows_by_group(batch, rows):
            for i, neg in self._group(batch, group, images).items():
                negatives[i] = [neg]
        return with_column(batch, COLUMN, negatives, drop=self.drop)

    def _item(self, batch, i: int, images) -> VerifyItem:
        objs = str(batch["objects"][i]) if "objects" in batch else ""
        return VerifyItem(item_id=str(batch["item_id"][i]), image=images[i], image_uri=str(batch["image_uri"][i]),
                          image_sha256=str(batch["image_sha256"][i]), objects=json.loads(objs) if objs else None)

    def _group(self, batch, rows: list[int], images) -> dict[int, dict]:
        out: dict[int, dict] = {}
        prompts = {i: str(batch["llava_prompt"][i]) for i in rows}
        texts = self._sample(batch, rows, images, prompts, self.cfg.num_samples, "sample", out)
        samples: dict[int, list[Sample]] = {}
        stats: dict[int, Counter] = {}
        for i, answers in texts.items():
            item = self._item(batch, i, images)
            before = Counter(self.verifier.stats)
            try:
                samples[i] = [Sample(t, s, verify_text(t, item, self.extractor, self.verifier)) for t, s in answers]
            except VerifierError as exc:
                out[i] = {"failed": exc.reason}
            stats[i] = Counter(self.verifier.stats) - before
        if self.cfg.pair_level == "response":
            for i, ss in samples.items():
                out[i] = self._response_negative(batch, i, ss)
        else:
            out.update(self._sentence_negatives(batch, images, samples, stats))
        for i, neg in out.items():
            if i in stats and stats[i]:
                neg["stats"] = dict(stats[i])
        return out

    def _sample(self, batch, rows: Sequence[int], images, prompts: dict[int, str], n: int, purpose: str,
                failed: dict[int, dict]) -> dict[int, list[tuple[str, int]]]:
        """Row -> ``n`` (text, seed) answers to ``prompts[row]`` on the clean image, one batch."""
        if not rows:
            return {}
        encoded = self.runner.encode([images[i] for i in rows], [prompts[i] for i in rows])
        lengths = self.runner.prompt_lengths(encoded)
        fit = []
        for i, ln in zip(rows, lengths):
            if ln + self.sampling.max_new_tokens <= self.runner.max_len:
                fit.append(i)
            else:
                failed[i] = {"failed": "prompt_too_long"}
        if not fit:
            return {}
        return self.runner.sample_answers(
            fit, images, prompts, n, self.sampling,
            lambda i, k: sampling_seed(self.seed, f"{STRATEGY}.{purpose}", str(batch["item_id"][i]), k))

    def _record(self, **extra: Any) -> dict[str, Any]:
        return {**self.provenance, **extra}

    def _response_negative(self, batch, i: int, samples: list[Sample]) -> dict:
        pick = response_pair(samples, self.cfg.min_gap)
        if isinstance(pick, str):
            return {"filtered": pick}
        best, worst = pick
        return {"chosen": samples[best].text, "text": samples[worst].text, "noise_step": None,
                "seed": samples[worst].seed, "generator": self.generator,
                "sampling": self._record(chosen_sample=best, rejected_sample=worst,
                                         chosen_verdicts=_verdicts_json(samples[best].verdicts),
                                         rejected_verdicts=_verdicts_json(samples[worst].verdicts),
                                         hallucinated=[s.hallucinated for s in samples],
                                         grounded=[s.grounded for s in samples])}

    def _sentence_negatives(self, batch, images, samples: dict[int, list[Sample]],
                            stats: dict[int, Counter]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        targets: dict[int, tuple[int, int]] = {}
        for i, ss in samples.items():
            t = sentence_target(ss)
            if t is None:
                out[i] = {"filtered": "no_hallucination"}
            else:
                targets[i] = t
        prefixes = {i: join_sentences([v.text for v in samples[i][k].verdicts[:cut]]) for i, (k, cut) in targets.items()}
        prompts = {i: continuation_prompt(str(batch["llava_prompt"][i]), prefixes[i]) for i in targets}
        conts_text = self._sample(batch, sorted(targets), images, prompts, self.cfg.num_continuations,
                                  "continuation", out)
        for i, answers in conts_text.items():
            item = self._item(batch, i, images)
            before = Counter(self.verifier.stats)
            try:
                conts = [Sample(t, s, verify_text(t, item, self.extractor, self.verifier)) for t, s in answers]
            except VerifierError as exc:
                out[i] = {"failed": exc.reason}
                continue
            finally:
                stats[i] = stats.get(i, Counter()) + (Counter(self.verifier.stats) - before)
            k, cut = targets[i]
            j = pick_continuation(conts, self.cfg.span, [v.text for v in samples[i][k].verdicts[:cut]])
            if j is None:
                out[i] = {"filtered": "no_grounded_continuation"}
                continue
            sample, cont = samples[i][k], conts[j]
            if self.cfg.span == "sentence":
                rejected_v, chosen_v = sample.verdicts[cut:cut + 1], cont.verdicts[:1]
            else:
                rejected_v, chosen_v = sample.verdicts[cut:], cont.verdicts
            out[i] = {"prompt": prompts[i], "chosen": join_sentences([v.text for v in chosen_v]),
                      "text": join_sentences([v.text for v in rejected_v]), "noise_step": None,
                      "seed": sample.seed, "generator": self.generator,
                      "sampling": self._record(rejected_sample=k, prefix_sentences=cut, chosen_continuation=j,
                                               chosen_seed=cont.seed,
                                               prefix_verdicts=_verdicts_json(sample.verdicts[:cut]),
                                               chosen_verdicts=_verdicts_json(chosen_v),
                                               rejected_verdicts=_verdicts_json(rejected_v))}
        return out


def resolve_synonyms(uri: Optional[str], source: str) -> dict[str, str]:
    """The verifier's object vocabulary: ``uri``, else ``world.json`` beside the source file."""
    from bpo_ray import storage
    from bpo_ray.generate.verifiers import load_synonyms

    if uri is None:
        parent = source.rsplit("/", 1)[0] if "/" in source else "."
        candidates = [storage.join(source.rstrip("/"), "world.json"), storage.join(parent, "world.json")]
        uri = next((c for c in candidates if storage.exists(c)), None)
        if uri is None:
            raise ValueError("strategy on_policy needs an object vocabulary: set generate.on_policy.verifier.synonyms "
                             f"(a world.json or CHAIR synonyms.txt); none found at {candidates}")
    return load_synonyms(os.path.expanduser(uri) if not uri.startswith("s3://") else uri)
