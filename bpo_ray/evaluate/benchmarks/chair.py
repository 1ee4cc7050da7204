"""Object HalBench-style CHAIR: detailed descriptions scored with ``bpo_ray.metrics.chair``.

CHAIR_s ("Resp") is the share of descriptions naming at least one object not in the image, CHAIR_i
("Obj") the share of hallucinated object mentions (Rohrbach et al. 2018; the BPO paper's Table 3
reports both on Object HalBench, the RLHF-V protocol of eight detailed-description prompts over
COCO images). Mentions are found by rules (the synonym table) or by the judge: the judge lists the
objects the description says are present (which handles negations such as "there is no dog"), and
its list is mapped to canonical objects through the same synonym table, so both paths share one
vocabulary and one scorer.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence

from bpo_ray import storage
from bpo_ray.config.evaluate import ChairSettings
from bpo_ray.metrics.chair import (ChairItem, MentionExtractor, ObjectMentionExtractor, chair_report,
                                 prior_typical_share, score_chair, synonyms_from_lines)
from bpo_ray.metrics.rohrbach import RohrbachExtractor
from bpo_ray.evaluate.items import EvalItem, LoadedBenchmark, row_meta
from bpo_ray.evaluate.judge import JudgeProtocol, JudgeRequest
from bpo_ray.evaluate.sources import BenchmarkDataError, first_human_turn, load_world_split, read_json
from bpo_ray.images import resolve_image_uri
from bpo_ray.world.grammar import well_formed_share

NAME = "chair"

DESCRIPTION_PROMPTS: tuple[str, ...] = (
    "Describe this image in great detail.",
    "Give a thorough description of the picture.",
    "What is happening in this image? Describe every part of it in detail.",
    "Describe the image in detail, including the objects, their colours and where they are.",
    "Write a detailed account of everything visible in this image.",
    "Provide an elaborate description of the given image.",
    "List and describe all the things you can see in the image.",
    "Explain what the image shows, covering each object in it.",
)
"""Eight detailed-description prompts for COCO images, in the spirit of Object HalBench's (RLHF-V)
eight prompts; cycled over images so each prompt covers an equal share."""

OBJECT_LIST_PROMPT = """You are given a description of an image written by an AI model.
List every physical object that the description says IS present in the image.
Leave out objects the description says are absent, and leave out colours, positions and counts.
Write each object as a singular noun phrase. Output only the list on one line, separated by commas,
or the single word none if no object is described.

Description:
{description}

Objects:"""


# ---------------------------------------------------------------------------------------------
# Loaders


def load_world(world_dir: str, settings: ChairSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """One item per test scene: its caption record's prompt (or ``settings.prompts``), its objects."""
    split = load_world_split(world_dir, "test", require_sources={"caption"})
    loaded = LoadedBenchmark(NAME, [], {"source": "world", "synonyms": split.synonyms,
                                        "prior_partners": split.prior_partners})
    seen: set[str] = set()
    for record in sorted(split.records, key=lambda r: r["id"]):
        if record["image"] in seen:
            continue
        if not record.get("objects"):
            loaded.skip("no_objects", record)
            continue
        seen.add(record["image"])
        question, _ = first_human_turn(record)
        if settings.prompts:
            question = settings.prompts[len(loaded.items) % len(settings.prompts)]
        loaded.items.append(EvalItem(f"{NAME}/{record['id']}", NAME, record["image"], question,
                                     meta={"objects": sorted(record["objects"])}))
        if max_items and len(loaded.items) >= max_items:
            break
    return loaded


def coco_truth(instances: Mapping[str, Any], captions: Optional[Mapping[str, Any]],
               extractor: MentionExtractor) -> tuple[dict[int, str], dict[int, set[str]]]:
    """``(file name per image id, canonical objects per image id)`` from COCO annotations.

    As CHAIR does, the truth is the segmentation categories plus objects the human captions name.
    """
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    files = {img["id"]: img["file_name"] for img in instances.get("images", [])}
    truth: dict[int, set[str]] = defaultdict(set)
    for ann in instances.get("annotations", []):
        if ann.get("category_id") in names and ann.get("image_id") in files:
            truth[ann["image_id"]].add(extractor.canonical(names[ann["category_id"]]))
    for ann in (captions or {}).get("annotations", []):
        if ann.get("image_id") in files:
            truth[ann["image_id"]].update(m.canonical for m in extractor.extract(ann.get("caption", "")))
    return files, truth


def make_extractor(info: Mapping[str, Any]) -> MentionExtractor:
    """The matcher a loaded CHAIR benchmark was built with: the synonym table (bias world, or COCO
    with ``matching: table``) or Rohrbach's COCO rules over the ``synonyms.txt`` lines."""
    matching = info.get("matching", "table")
    if matching == "table":
        return ObjectMentionExtractor(info["synonyms"])
    return RohrbachExtractor(info["synonym_lines"], mode=matching)


def load_coco(settings: ChairSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """COCO images with instances (+ captions) annotations and CHAIR's synonyms.txt (without it,
    the category names are the vocabulary), matched as ``settings.matching`` says."""
    instances = read_json(settings.instances)
    captions = read_json(settings.captions) if settings.captions else None
    if settings.synonyms:
        lines = storage.read_text(settings.synonyms).splitlines()
    else:
        lines = [c["name"] for c in instances.get("categories", [])]
    synonyms = synonyms_from_lines(lines)
    if not synonyms:
        raise BenchmarkDataError(f"{settings.instances}: no categories and no synonyms file")
    info = {"source": "coco", "synonyms": synonyms, "synonym_lines": lines, "matching": settings.matching}
    files, truth = coco_truth(instances, captions, make_extractor(info))
    prompts = settings.prompts or list(DESCRIPTION_PROMPTS)
    loaded = LoadedBenchmark(NAME, [], info)
    for image_id in sorted(files):
        if not truth.get(image_id):
            loaded.skip("no_objects", {"image_id": image_id, "file_name": files[image_id]})
            continue
        question = prompts[len(loaded.items) % len(prompts)]
        image = resolve_image_uri(files[image_id], settings.images)
        loaded.items.append(EvalItem(f"{NAME}/{image_id}", NAME, image, question,
                                     meta={"objects": sorted(truth[image_id])}))
        if max_items and len(loaded.items) >= max_items:
            break
    return loaded


# ---------------------------------------------------------------------------------------------
# Judge protocol: list the objects a description claims


def object_list_request(row: Mapping[str, Any], attempt: int) -> JudgeRequest:
    prompt = OBJECT_LIST_PROMPT.format(description=row["answer"].strip())
    return JudgeRequest([{"role": "user", "content": prompt}], max_tokens=256, temperature=0.0)


_LIST_PREFIX = re.compile(r"^\s*(objects?\s*:|[-*\u2022]|\d+[.)])\s*", re.I)


def parse_object_list(text: str) -> list[str]:
    """Object names from the judge's reply: comma, semicolon or line separated, bullets and a
    leading "Objects:" tolerated; "none" (or nothing) gives an empty list."""
    names: list[str] = []
    for line in text.splitlines():
        line = _LIST_PREFIX.sub("", line.strip())
        for part in re.split(r"[,;]", line):
            name = re.sub(r"^(and|a|an|the)\s+", "", part.strip().strip(".").strip(), flags=re.I).strip()
            if name and name.lower() not in {"none", "n/a", "nothing"}:
                names.append(name)
    return names


OBJECT_LIST_JUDGE = JudgeProtocol(build=object_list_request, parse=parse_object_list, attempts=1)


# ---------------------------------------------------------------------------------------------
# Scorer


def judged_item(listed: Sequence[str], ground_truth: Sequence[str], extractor: MentionExtractor) -> ChairItem:
    """CHAIR details from the judge's object list: each listed name is matched on its own (joining
    them would let "dog", "leash" read as the phrase "dog leash"); names outside the vocabulary
    are dropped, as CHAIR ignores words that are not objects it knows."""
    truth = sorted({extractor.canonical(name) for name in ground_truth})
    mentioned = [m.canonical for name in listed for m in extractor.extract(name)]
    return ChairItem(", ".join(listed), truth, mentioned, [name for name in mentioned if name not in truth])


def score(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], extractor_mode: str = "rules") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CHAIR over answered rows; returns ``(metrics, per-item details)``.

    ``rules``: mentions found in the answer by the benchmark's matcher (``make_extractor``: the
    synonym table, or Rohrbach's COCO rules). ``judge``: the objects the judge listed (each row's
    ``judge_value``), mapped through the same matcher.
    """
    truths = [row_meta(row)["objects"] for row in rows]
    extractor = make_extractor(info)
    if extractor_mode == "judge":
        report = chair_report([judged_item(json.loads(row["judge_value"]), truth, extractor)
                               for row, truth in zip(rows, truths)])
    else:
        report = score_chair([row["answer"] for row in rows], truths, extractor)
    metrics: dict[str, Any] = {**report.summary(), "extractor": extractor_mode,
                               "matching": info.get("matching", "table")}
    partners = info.get("prior_partners")
    if partners:
        metrics["prior_typical_share"] = prior_typical_share(report.items, partners)
    if info.get("source") == "world":
        metrics["well_formed"] = well_formed_share(row["answer"] for row in rows)
    details = [
        {"id": row["id"], "mentioned": item.mentioned, "hallucinated": item.hallucinated,
         "ground_truth": item.ground_truth}
        for row, item in zip(rows, report.items)
    ]
    return metrics, details
