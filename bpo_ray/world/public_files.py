"""The bias world's test split written in Object HalBench's and AMBER's public file formats.

``evaluate`` reads these files with the same loaders that read the real benchmarks, so the demo
exercises the public formats end to end (``source: world`` of ``evaluate.objhal`` / ``.amber``):

Object HalBench (RLHF-V / RLAIF-V layout), one question per test scene (its caption prompt):
  ``objhal/questions.jsonl``   ``{image_id, question, image_path}``
  ``objhal/instances.json``    COCO ``instances`` format: the scene's objects as annotations,
                               the world's kinds as categories
  ``objhal/synonyms.txt``      ``synonyms_refine.txt`` format: ``kind, synonym, ...`` per line
  ``objhal/wordnet/``          the world's own noun dictionary in WordNet's ``index.noun`` /
                               ``noun.exc`` format (its kinds and synonyms, irregular plurals such
                               as "knives knife"), so lemmas do not depend on an installed WordNet

AMBER (``data/`` layout), per test scene one generative query (the caption prompt) and two
existence probes (a present kind, and an absent one: the prior partner of a present kind where
there is one, the hallucination this world provokes):
  ``amber/annotations.json``   ``{id, type, truth[, hallu]}``; generative ``hallu`` = the absent
                               prior partners of the scene's kinds
  ``amber/query_all.json``     ``{id, image, query}``, a scene's three queries together (so
                               ``max_items`` takes whole scenes)
  ``amber/relation.json``      kind -> its one-word synonyms (AMBER's association words)

Images stay where the world keeps them: every ``image`` / ``image_path`` is relative to the world
directory, which the loaders get as their ``images`` directory. The files are derived, so they are
written once per world under ``<world>/public/`` and rewritten only when missing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bpo_ray import storage
from bpo_ray.evaluate.sources import absolute_uri, first_human_turn, load_world_split

PUBLIC_DIR = "public"
_DONE = "done.json"  # written last: a folder without it is (re)written
_SCENE_NUMBER = re.compile(r"(\d+)")


def _scene_number(record_id: str) -> int:
    """COCO-style integer image id of a world record id ("scene-000008-caption" -> 8)."""
    match = _SCENE_NUMBER.search(record_id)
    if not match:
        raise ValueError(f"world record id {record_id!r} has no scene number")
    return int(match.group(1))


def _relative(image: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return image[len(prefix):] if image.startswith(prefix) else image


def _caption_records(world_dir: str) -> tuple[Any, list[dict[str, Any]]]:
    """The test split and its caption records with objects, sorted by id, one per image."""
    split = load_world_split(world_dir, "test", require_sources={"caption"})
    seen: set[str] = set()
    records = []
    for record in sorted(split.records, key=lambda r: r["id"]):
        if record.get("objects") and record["image"] not in seen:
            seen.add(record["image"])
            records.append(record)
    return split, records


def _question(record: dict[str, Any]) -> str:
    return first_human_turn(record)[0]


def _forms_by_kind(synonyms: dict[str, str], kinds: list[str]) -> dict[str, list[str]]:
    forms: dict[str, list[str]] = {kind: [kind] for kind in kinds}
    for form, kind in sorted(synonyms.items()):
        if kind in forms and form != kind:
            forms[kind].append(form)
    return forms


def wordnet_files(forms: dict[str, list[str]]) -> tuple[str, str]:
    """``(index.noun, noun.exc)`` texts of the world's dictionary: every word of every object form
    is a noun; the world's irregular plurals ("knives", "mice") are exceptions."""
    from bpo_ray.world import vocab

    nouns = sorted({word for names in forms.values() for name in names for word in name.split()})
    index = "".join(f"{noun} n 1 0 1 0 00000000\n" for noun in nouns)
    regular = ("s", "es")
    exceptions = sorted(f"{plural} {kind}\n" for kind, plural in vocab.PLURALS.items()
                        if not any(plural == kind + suffix for suffix in regular))
    return index, "".join(exceptions)


def _done(folder: str) -> bool:
    return storage.exists(storage.join(folder, _DONE))


def write_objhal_files(world_dir: str) -> dict[str, str]:
    """Object HalBench's files for the world (see module doc); ``{setting: uri}`` for
    ``evaluate.objhal`` (questions, instances, synonyms, wordnet, images)."""
    root = absolute_uri(world_dir)
    folder = storage.join(root, PUBLIC_DIR, "objhal")
    paths = {"questions": storage.join(folder, "questions.jsonl"), "instances": storage.join(folder, "instances.json"),
             "synonyms": storage.join(folder, "synonyms.txt"), "wordnet": storage.join(folder, "wordnet"),
             "images": root}
    if _done(folder):
        return paths
    split, records = _caption_records(world_dir)
    kinds = split.objects
    category = {kind: n + 1 for n, kind in enumerate(kinds)}
    questions, images, annotations = [], [], []
    for record in records:
        image_id, image = _scene_number(record["id"]), _relative(record["image"], split.root)
        questions.append(json.dumps({"image_id": image_id, "question": _question(record), "image_path": image}))
        images.append({"id": image_id, "file_name": image})
        for kind in sorted(record["objects"]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[kind]})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i, "name": kind} for kind, i in category.items()]}
    forms = _forms_by_kind(split.synonyms, kinds)
    index, exceptions = wordnet_files(forms)
    storage.write_text(paths["questions"], "\n".join(questions) + "\n")
    storage.write_text(paths["instances"], json.dumps(instances))
    storage.write_text(paths["synonyms"], "".join(", ".join(names) + "\n" for names in forms.values()))
    storage.write_text(storage.join(paths["wordnet"], "index.noun"), index)
    storage.write_text(storage.join(paths["wordnet"], "noun.exc"), exceptions)
    storage.write_text(storage.join(folder, _DONE), json.dumps({"questions": len(questions)}))
    return paths


def _absent_probe(kinds: list[str], present: list[str], partners: dict[str, str], n: int) -> str:
    """The absent kind asked about: a missing prior partner of a present kind, else the next
    absent kind of the vocabulary after a per-scene offset."""
    for kind in present:
        partner = partners.get(kind)
        if partner and partner not in present:
            return partner
    absent = [kind for kind in kinds if kind not in present]
    return absent[n % len(absent)]


def write_amber_files(world_dir: str) -> dict[str, str]:
    """AMBER's files for the world (see module doc); ``{setting: uri}`` for ``evaluate.amber``
    (annotations, queries, relation, wordnet, images)."""
    from bpo_ray.metrics.pope import pope_question

    root = absolute_uri(world_dir)
    folder = storage.join(root, PUBLIC_DIR, "amber")
    objhal = write_objhal_files(world_dir)  # the same world dictionary lemmatizes AMBER's nouns
    paths = {"annotations": storage.join(folder, "annotations.json"), "queries": storage.join(folder, "query_all.json"),
             "relation": storage.join(folder, "relation.json"), "wordnet": objhal["wordnet"], "images": root}
    if _done(folder):
        return paths
    split, records = _caption_records(world_dir)
    kinds, partners = split.objects, split.prior_partners
    generative, discriminative, queries = [], [], []
    n_scenes = len(records)
    for n, record in enumerate(records):
        present = sorted(record["objects"])
        image = _relative(record["image"], split.root)
        hallu = sorted({partners[k] for k in present if k in partners and partners[k] not in present})
        gen_id = n + 1
        generative.append({"id": gen_id, "type": "generative", "truth": present, "hallu": hallu})
        queries.append({"id": gen_id, "image": image, "query": _question(record)})
        for offset, (kind, truth) in enumerate(((present[n % len(present)], "yes"),
                                                 (_absent_probe(kinds, present, partners, n), "no"))):
            probe_id = n_scenes + 2 * n + offset + 1  # discriminative ids follow the generative ones, as in AMBER
            discriminative.append({"id": probe_id, "type": "discriminative-hallucination", "truth": truth})
            queries.append({"id": probe_id, "image": image, "query": pope_question(kind)})
    relation = {kind: [form for form in names[1:] if " " not in form]
                for kind, names in _forms_by_kind(split.synonyms, kinds).items()}
    storage.write_text(paths["annotations"], json.dumps(generative + sorted(discriminative, key=lambda a: a["id"])))
    storage.write_text(paths["queries"], json.dumps(queries))
    storage.write_text(paths["relation"], json.dumps(relation))
    storage.write_text(storage.join(folder, _DONE), json.dumps({"scenes": n_scenes, "queries": len(queries)}))
    return paths
