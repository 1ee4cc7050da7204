"""POPE through the served model: probes from the official files or from the bias world.

Official files (Li et al. 2023, ``coco_pope_{random,popular,adversarial}.json``) are JSON Lines of
``{"question_id", "image", "text", "label"}``, one file per split. Bias-world probes come from
``bpo_ray.metrics.pope.build_pope_probes`` over the test scenes, with each object's prior partner as the
adversarial negative (the object the language prior expects), which is what BPO should fix.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Optional, Sequence

from bpo_ray.config.evaluate import PopeSettings
from bpo_ray.metrics.pope import POPE_SPLITS, PopeScores, build_pope_probes, parse_answer, score_pope
from bpo_ray.evaluate.items import EvalItem, LoadedBenchmark, row_meta
from bpo_ray.evaluate.sources import load_world_split, read_records
from bpo_ray.images import resolve_image_uri

NAME = "pope"
SUMMARY_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _question(text: str, suffix: str) -> str:
    return f"{text}\n{suffix}" if suffix else text


def load_world(world_dir: str, settings: PopeSettings, max_items: Optional[int], seed: int = 0) -> LoadedBenchmark:
    split = load_world_split(world_dir, "test")
    # Probes are drawn per image from a seed that includes the image's key: key on the path inside
    # the world (as world/evaluate_base does), so a world built or copied elsewhere asks the same.
    prefix = split.root.rstrip("/") + "/"
    annotations: dict[str, list[str]] = {}
    uri_of: dict[str, str] = {}
    for record in sorted(split.records, key=lambda r: r["id"]):
        key = record["image"][len(prefix):] if record["image"].startswith(prefix) else record["image"]
        uri_of[key] = record["image"]
        annotations.setdefault(key, sorted(record.get("objects") or []))
    ranking = {kind: [partner] for kind, partner in split.prior_partners.items()}
    probes = build_pope_probes(annotations, vocabulary=split.objects, n_per_image=settings.n_per_image,
                               seed=seed, adversarial_ranking=ranking)
    loaded = LoadedBenchmark(NAME, [], {"source": "world"})
    per_split: dict[str, int] = {}
    for probe in probes:
        if max_items and per_split.get(probe["split"], 0) >= max_items:
            continue
        per_split[probe["split"]] = per_split.get(probe["split"], 0) + 1
        loaded.items.append(EvalItem(
            f"{NAME}/{probe['id']}", NAME, uri_of[probe["image"]], _question(probe["question"], settings.prompt_suffix),
            reference=probe["label"], category=probe["split"],
            meta={"label": probe["label"], "split": probe["split"], "object": probe["object"]}))
    return loaded


def load_official(settings: PopeSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """Official POPE files, ``settings.files`` mapping split name -> file (local or s3://)."""
    loaded = LoadedBenchmark(NAME, [], {"source": "pope"})
    for split_name, uri in settings.files.items():
        records, bad = read_records(uri)
        for line in bad:
            loaded.skip("bad_json", line)
        taken = 0
        for record in records:
            label = str(record.get("label", "")).strip().lower()
            if label not in ("yes", "no") or not record.get("image") or not record.get("text"):
                loaded.skip("bad_pope_record", record)
                continue
            if max_items and taken >= max_items:
                break
            taken += 1
            qid = record.get("question_id", taken)
            loaded.items.append(EvalItem(
                f"{NAME}/{split_name}-{qid}", NAME, resolve_image_uri(record["image"], settings.images),
                _question(record["text"], settings.prompt_suffix), reference=label, category=split_name,
                meta={"label": label, "split": split_name, "question_id": qid}))
    return loaded


def _split_metrics(by_split: Mapping[str, PopeScores]) -> dict[str, Any]:
    metrics: dict[str, Any] = {split: asdict(scores) for split, scores in by_split.items()}
    if by_split:
        metrics["mean"] = {k: sum(getattr(s, k) for s in by_split.values()) / len(by_split) for k in SUMMARY_KEYS}
    return metrics


def score(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-split accuracy/precision/recall/F1/yes-ratio plus their mean over the splits present.

    The top level reads answers with POPE's official rule (``parse: official``, comparable with
    published tables); ``strict`` holds the same metrics under bpo-ray's strict parse.
    """
    probes = [{"split": row_meta(r)["split"], "label": row_meta(r)["label"]} for r in rows]
    answers = [r["answer"] for r in rows]
    metrics: dict[str, Any] = {**_split_metrics(score_pope(probes, answers, "official")), "parse": "official",
                               "strict": _split_metrics(score_pope(probes, answers, "strict"))}
    details = [{"id": r["id"], "label": p["label"], "prediction": parse_answer(a, "official"),
                "prediction_strict": parse_answer(a, "strict")} for r, p, a in zip(rows, probes, answers)]
    return metrics, details


__all__ = ["NAME", "POPE_SPLITS", "load_world", "load_official", "score"]
