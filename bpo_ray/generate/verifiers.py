"""Verifiers for on-policy pairs: is each object an answer mentions really in the image?

One small interface (``ObjectVerifier.verify(item, objects) -> {object: present}``), three kinds:

- ``AnnotationVerifier``: the item's object annotations (the bias world's ``objects`` field, or a
  COCO instances / Visual Genome objects JSON keyed by image), matched through the same synonym
  table as CHAIR (``bpo_ray.metrics.chair.ObjectMentionExtractor``), as CHAIR itself decides.
- ``JudgeClaimVerifier``: RLAIF-V's divide and conquer (Yu et al., CVPR 2025, section 3.1): one
  atomic yes/no claim per mentioned object (``CLAIM_TEMPLATE``) sent with the image to any
  OpenAI-compatible judge (the project's judge proxy caches every deterministic call).
- ``DetectorVerifier``: an open-vocabulary detector (OWLv2, Minderer et al. 2023, through
  transformers) or, where none runs, ``SceneTruthDetector`` over the annotations, behind
  ``ObjectDetector.detect(image, queries)``.

A verifier that cannot decide raises ``VerifierError(reason)``; the item is then quarantined with
that reason, never silently paired.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Mapping, Optional, Protocol, Sequence

from PIL import Image

from bpo_ray import storage
from bpo_ray.metrics.chair import MentionExtractor, synonyms_from_lines

CLAIM_TEMPLATE = "Is there {article} {obj} in the image? Answer yes or no."


class VerifierError(RuntimeError):
    """The verifier could not give a verdict; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class VerifyItem:
    """What a verifier may look at: the item's id, image, image URI and annotated objects."""

    item_id: str
    image: Image.Image
    image_uri: str
    image_sha256: str
    objects: Optional[list[str]]  # the record's own annotation, if any


class ObjectVerifier(Protocol):
    name: str
    stats: Counter

    def verify(self, item: VerifyItem, objects: Sequence[str]) -> dict[str, bool]:
        """``object -> present`` for every canonical object in ``objects``."""


# ---------------------------------------------------------------- vocabulary and annotation files
def load_synonyms(uri: str) -> dict[str, str]:
    """Surface form -> canonical object, from a bias-world ``world.json`` (its ``synonyms``) or
    CHAIR's ``synonyms.txt`` (``canonical, synonym, ...`` per line)."""
    text = storage.read_text(uri)
    if uri.endswith(".json"):
        data = json.loads(text)
        syn = data.get("synonyms") if isinstance(data, dict) else None
        if not isinstance(syn, dict) or not syn:
            raise ValueError(f"{uri}: no 'synonyms' object (expected a bias-world world.json)")
        return {str(k): str(v) for k, v in syn.items()}
    syn = synonyms_from_lines(text.splitlines())
    if not syn:
        raise ValueError(f"{uri}: no synonyms (expected CHAIR's synonyms.txt format)")
    return syn


def load_coco_instances(data: Mapping[str, Any]) -> dict[str, set[str]]:
    """COCO ``instances_*.json`` -> ``{file_name: names, str(image_id): names}`` (category names)."""
    try:
        cats = {c["id"]: c["name"] for c in data["categories"]}
        out: dict[str, set[str]] = {}
        names: dict[Any, set[str]] = {img["id"]: set() for img in data["images"]}
        for ann in data.get("annotations", []):
            names.setdefault(ann["image_id"], set()).add(cats[ann["category_id"]])
        for img in data["images"]:
            out[str(img["file_name"])] = out[str(img["id"])] = names[img["id"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a COCO instances file: missing or bad {exc}") from exc
    return out


def load_visual_genome_objects(data: Any) -> dict[str, set[str]]:
    """Visual Genome ``objects.json`` (a list of ``{"image_id", "objects": [{"names": [...]}]}``)
    -> ``{str(image_id): names, "<image_id>.jpg": names}`` (VG's image file names)."""
    if not isinstance(data, list):
        raise ValueError("not a Visual Genome objects file: expected a JSON list of images")
    out: dict[str, set[str]] = {}
    try:
        for entry in data:
            names = {str(n).strip().lower() for obj in entry["objects"] for n in obj.get("names", [obj.get("name")])
                     if n}
            image_id = str(entry["image_id"])
            out[image_id] = out[f"{image_id}.jpg"] = names
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a Visual Genome objects file: missing or bad {exc}") from exc
    return out


def load_annotations(uri: str, fmt: str) -> dict[str, set[str]]:
    data = json.loads(storage.read_text(uri))
    return load_coco_instances(data) if fmt == "coco" else load_visual_genome_objects(data)


def image_keys(image_uri: str) -> list[str]:
    """Keys an annotation file may use for this image: file name, stem, and the image id that
    COCO / VG file names end in (``COCO_train2014_000000000009.jpg`` -> ``9``)."""
    name = PurePosixPath(image_uri).name
    stem = name.rsplit(".", 1)[0]
    keys = [name, stem]
    digits = re.search(r"(\d+)$", stem)
    if digits:
        keys.append(str(int(digits.group(1))))
    return keys


# ---------------------------------------------------------------- annotations
class AnnotationVerifier:
    """Verdicts from annotations: the record's ``objects`` field, else ``table`` looked up by image."""

    name = "annotations"

    def __init__(self, extractor: MentionExtractor, table: Optional[Mapping[str, set[str]]] = None):
        self.extractor = extractor
        self.table = table
        self.stats: Counter = Counter()

    def truth(self, item: VerifyItem) -> set[str]:
        names: Optional[Sequence[str]] = item.objects
        if names is None and self.table is not None:
            for key in image_keys(item.image_uri):
                if key in self.table:
                    names = sorted(self.table[key])
                    break
        if names is None:
            raise VerifierError("no_annotations", item.image_uri)
        return {self.extractor.canonical(n) for n in names}

    def verify(self, item: VerifyItem, objects: Sequence[str]) -> dict[str, bool]:
        truth = self.truth(item)
        return {o: o in truth for o in objects}


# ---------------------------------------------------------------- judge claims
def claim_text(obj: str) -> str:
    """RLAIF-V-style atomic claim for one object, in exactly ``CLAIM_TEMPLATE``."""
    return CLAIM_TEMPLATE.format(article="an" if obj[:1].lower() in "aeiou" else "a", obj=obj)


_YES_NO = re.compile(r"\b(yes|no)\b")


def parse_yes_no(reply: Optional[str]) -> Optional[bool]:
    """``True`` / ``False`` for a yes / no reply ("Yes.", "no, there is not", "**Yes**"), ``None``
    when the reply is empty, says neither, or says both before committing (unusable)."""
    text = (reply or "").strip().lower()
    if not text:
        return None
    first = re.match(r"^[\W_]*(yes|no)\b", text)
    if first:
        return first.group(1) == "yes"
    found = set(_YES_NO.findall(text))
    return (found.pop() == "yes") if len(found) == 1 else None


class JudgeClaimVerifier:
    """One yes/no claim per object to an OpenAI-compatible judge, image attached as a data URL.

    Deterministic requests (temperature 0, seed 0) so the judge proxy answers repeats from its
    cache; this verifier also remembers (image, object) verdicts itself. An outage or an
    unusable reply is retried ``max_retries`` times, then raises ``VerifierError``. ``stats``
    counts ``judge_calls``, ``judge_cache_hits`` (the proxy's ``X-BPO-Cache: hit``),
    ``judge_local_hits`` and ``judge_retries``.
    """

    name = "judge"

    def __init__(self, base_url: str, model: str, token_env: str = "BPO_JUDGE_TOKEN", timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 0.5):
        from bpo_ray.serving.judge.client import judge_client

        # The project's one judge client: the proxy's token from the environment, never logged;
        # retries are this verifier's own (counted), not the client's.
        self.client = judge_client(base_url, token_env=token_env, timeout_s=timeout_s, max_retries=0)
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.memo: dict[tuple[str, str], bool] = {}
        self.stats: Counter = Counter()
        self._lock = threading.Lock()

    def ask(self, image_url: str, obj: str) -> bool:
        import openai

        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                 {"type": "text", "text": claim_text(obj)}]}]
        last = "judge_unusable_reply"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("judge_retries")
                time.sleep(self.backoff_s * attempt)
            self._count("judge_calls")
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, temperature=0, seed=0, max_tokens=8)
                reply = raw.parse()
            except openai.OpenAIError:
                last = "judge_unavailable"
                continue
            if raw.headers.get("x-bpo-cache") == "hit":
                self._count("judge_cache_hits")
            text = reply.choices[0].message.content if reply.choices else ""
            verdict = parse_yes_no(text)
            if verdict is not None:
                return verdict
            last = "judge_unusable_reply"
        raise VerifierError(last, obj)

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def verify(self, item: VerifyItem, objects: Sequence[str]) -> dict[str, bool]:
        """Claims for objects not yet decided for this image go to the judge in parallel."""
        from concurrent.futures import ThreadPoolExecutor

        from bpo_ray.images import to_data_url

        objects = list(dict.fromkeys(objects))
        todo = [o for o in objects if (item.image_sha256, o) not in self.memo]
        for _ in range(len(objects) - len(todo)):
            self._count("judge_local_hits")
        if todo:
            url = to_data_url(item.image)
            with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
                for obj, verdict in zip(todo, pool.map(lambda o: self.ask(url, o), todo)):
                    self.memo[(item.image_sha256, obj)] = verdict
        return {o: self.memo[(item.image_sha256, o)] for o in objects}


# ---------------------------------------------------------------- detector
class ObjectDetector(Protocol):
    def detect(self, item: VerifyItem, queries: Sequence[str]) -> set[str]:
        """The subset of ``queries`` (object names) found in the item's image."""


class SceneTruthDetector:
    """A detector that sees the scene's ground truth (the item's annotations): the bias world's
    stand-in for OWLv2 where no detector checkpoint can be downloaded (tests, CPU demo)."""

    def __init__(self, annotations: AnnotationVerifier):
        self.annotations = annotations

    def detect(self, item: VerifyItem, queries: Sequence[str]) -> set[str]:
        truth = self.annotations.truth(item)
        return {q for q in queries if q in truth}


class Owlv2Detector:
    """OWLv2 open-vocabulary detection through transformers (``Owlv2ForObjectDetection``): text
    queries ``"a photo of a {object}"``, an object is present when any box scores >= ``threshold``.
    Needs the checkpoint (``model_id``) on the node; not exercised on this CPU box."""

    def __init__(self, model_id: str, threshold: float = 0.3, device: str = "auto"):
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.processor = Owlv2Processor.from_pretrained(model_id)
        self.model = Owlv2ForObjectDetection.from_pretrained(model_id).to(self.device).eval()
        self.threshold = threshold

    def detect(self, item: VerifyItem, queries: Sequence[str]) -> set[str]:
        import torch

        queries = list(queries)
        if not queries:
            return set()
        inputs = self.processor(text=[[f"a photo of a {q}" for q in queries]], images=item.image,
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits  # (1, n_boxes, n_queries)
        best = torch.sigmoid(logits[0]).max(dim=0).values
        return {q for q, s in zip(queries, best.tolist()) if s >= self.threshold}


class DetectorVerifier:
    """Verdicts from an ``ObjectDetector``: present iff detected."""

    name = "detector"

    def __init__(self, detector: ObjectDetector):
        self.detector = detector
        self.stats: Counter = Counter()

    def verify(self, item: VerifyItem, objects: Sequence[str]) -> dict[str, bool]:
        if not objects:
            return {}
        found = self.detector.detect(item, objects)
        self.stats["detector_calls"] += 1
        return {o: o in found for o in objects}


def make_verifier(cfg, extractor: MentionExtractor, table: Optional[Mapping[str, set[str]]] = None) -> ObjectVerifier:
    """The verifier ``cfg`` (a ``VerifierConfig``) names."""
    if cfg.kind == "annotations":
        return AnnotationVerifier(extractor, table)
    if cfg.kind == "judge":
        if not cfg.judge_url:
            raise ValueError("generate.on_policy.verifier.judge_url is not set (an OpenAI-compatible base URL)")
        return JudgeClaimVerifier(cfg.judge_url, cfg.judge_model, cfg.judge_token_env, cfg.timeout_s, cfg.max_retries)
    det = cfg.detector
    if det.kind == "scene_truth":
        return DetectorVerifier(SceneTruthDetector(AnnotationVerifier(extractor, table)))
    return DetectorVerifier(Owlv2Detector(det.model_id, det.threshold, det.device))
