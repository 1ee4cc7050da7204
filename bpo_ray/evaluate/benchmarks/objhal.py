"""Object HalBench through the served model, scored as RLHF-V / RLAIF-V score it.

Questions: RLHF-V's ``eval/data/obj_halbench_300_with_image.jsonl`` (the fixed 300 COCO val2014
images with detailed-description prompts; JSON Lines ``{"image_id", "question", "image"}`` with
the image as base64, or ``"image_path"``), COCO ``instances``/``captions`` val2014 for the truth,
RLAIF-V's ``synonyms_refine.txt`` and a WordNet 3.0 database. Scores: ``bpo_ray.metrics.objhal``
(CHAIRs_refine is the "Resp." papers print, CHAIRi the "Ment.").

``load_world``: the bias world's test split, written in those formats by
``bpo_ray.world.public_files`` and read by ``load`` like the real files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

from bpo_ray import storage
from bpo_ray.config.evaluate import ObjHalSettings
from bpo_ray.metrics.objhal import ObjHalExtractor, ObjHalReport, coco_objhal_truth, score_answer, score_listed
from bpo_ray.metrics.wordnet import NounLemmatizer
from bpo_ray.evaluate.items import EvalItem, LoadedBenchmark, row_meta
from bpo_ray.evaluate.sources import BenchmarkDataError, read_json, read_records
from bpo_ray.images import resolve_image_uri

NAME = "objhal"


def make_extractor(info: Mapping[str, Any]) -> ObjHalExtractor:
    return ObjHalExtractor(info["synonym_lines"], NounLemmatizer.from_dir(info.get("wordnet")))


def _image_uri(record: Mapping[str, Any], settings: ObjHalSettings) -> str:
    if record.get("image"):
        data = base64.b64decode(record["image"], validate=True)
        cache = os.path.expanduser(settings.image_cache)
        path = os.path.join(cache, hashlib.sha256(data).hexdigest()[:32] + ".jpg")
        if not os.path.exists(path):
            storage.write_bytes(path, data)
        return path
    name = record.get("image_path") or f"COCO_val2014_{int(record['image_id']):012d}.jpg"
    return resolve_image_uri(name, settings.images)


def load_world(world_dir: str, settings: ObjHalSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """The world's test scenes as Object HalBench files (``bpo_ray.world.public_files``), read by ``load``."""
    from bpo_ray.world.public_files import write_objhal_files

    loaded = load(settings.model_copy(update=write_objhal_files(world_dir)), max_items)
    loaded.info["source"] = "world"
    return loaded


def load(settings: ObjHalSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """One item per question record; bad records are skipped with a reason."""
    if not (settings.questions and settings.instances and settings.synonyms):
        raise BenchmarkDataError("objhal needs evaluate.objhal.questions, instances and synonyms")
    lines = storage.read_text(settings.synonyms).splitlines()
    info = {"source": "objhal", "synonym_lines": lines, "wordnet": settings.wordnet}
    extractor = make_extractor(info)
    records, bad = read_records(settings.questions)
    loaded = LoadedBenchmark(NAME, [], info)
    for line in bad:
        loaded.skip("bad_json", line)
    usable = []
    for record in records:
        if not isinstance(record.get("image_id"), (int, str)) or not str(record.get("image_id")).isdigit() \
                or not record.get("question"):
            loaded.skip("bad_objhal_record", {k: v for k, v in record.items() if k != "image"})
            continue
        usable.append(record)
    ids = [int(r["image_id"]) for r in usable]
    captions = read_json(settings.captions) if settings.captions else None
    try:
        truth = coco_objhal_truth(read_json(settings.instances), captions, extractor, ids)
    except ValueError as exc:  # a category the synonyms file does not know: the files do not belong together
        raise BenchmarkDataError(f"{settings.instances} with {settings.synonyms}: {exc}") from None
    for index, record in enumerate(usable):
        if max_items and len(loaded.items) >= max_items:
            break
        try:
            image = _image_uri(record, settings)
        except (ValueError, TypeError) as exc:
            loaded.skip("bad_image", {"image_id": record["image_id"], "error": str(exc)})
            continue
        image_id = int(record["image_id"])
        loaded.items.append(EvalItem(f"{NAME}/{index}-{image_id}", NAME, image, record["question"],
                                     meta={"image_id": image_id, "objects": sorted(truth[image_id])}))
    return loaded


def score(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any],
          extractor_mode: str = "rules") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reference's ``overall_metrics`` over the answered rows (``nan`` rates become ``None``).
    ``extractor_mode``: ``rules`` (the rule path) or ``judge`` (the objects the judge listed, each
    row's ``judge_value``, read by the rules: ``score_listed``)."""
    extractor = make_extractor(info)
    answers = [row["answer"].replace("Assistant:", "").strip() for row in rows]
    if extractor_mode == "judge":
        items = [score_listed(a, json.loads(row["judge_value"]), row_meta(row)["objects"], extractor)
                 for a, row in zip(answers, rows)]
    else:
        items = [score_answer(a, row_meta(row)["objects"], extractor) for a, row in zip(answers, rows)]
    summary = ObjHalReport(items).summary()
    metrics: dict[str, Any] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    metrics["extractor"] = extractor_mode
    details = [{"id": row["id"], "mentioned": item.mentioned, "hallucinated": item.hallucinated,
                "ground_truth": item.ground_truth} for row, item in zip(rows, items)]
    return metrics, details
