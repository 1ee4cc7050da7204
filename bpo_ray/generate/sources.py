"""Read LLaVA-format records and explode them into (image, question, answer, history) items.

ShareGPT4V, LLaVA-Instruct, LLaVAR and the bias world all store
``{"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`` as a JSON
array or JSON Lines, locally or on s3://. Every human/gpt turn pair is one *item*: the question,
its ground-truth answer (the paper's positive response, section 3) and the earlier turns as
history. Nothing raises on bad input: each problem becomes a quarantined item with a reason.

Accounting rule (what ``items_in`` counts): a record whose structure is usable contributes one
item per human turn; a record that cannot be exploded at all (bad JSON, no id, duplicate id,
malformed conversation, ...) contributes exactly one quarantined item.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Iterator, Optional

from bpo_ray import storage
from bpo_ray.images import resolve_image_uri
from bpo_ray.models.prompts import build_prompt, strip_image_token

HUMAN_ROLES = {"human", "user"}
ANSWER_ROLES = {"gpt", "assistant"}
SKIPPED_ROLES = {"system"}
SOURCE_SUFFIXES = (".json", ".jsonl")
RAW_CHARS = 2000
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class SourceError(ValueError):
    """The source itself cannot be read (not a per-record problem); the message names the URI."""


@dataclass
class SourceRead:
    """Every item of a source in a stable order; quarantined ones carry a reason."""

    items: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return sum(1 for it in self.items if it["status"] == "ok")


def _raw(value: Any) -> str:
    """A bounded, always-valid-UTF-8 rendering of a bad record for the quarantine table."""
    if isinstance(value, str):
        text = _SURROGATE.sub("\ufffd", value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=True, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return text[:RAW_CHARS]


def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


#: The columns of an item row, in order (every pipeline stage passes them through).
ITEM_COLUMNS = ("order", "shard", "item_id", "record_id", "turn", "source", "image_uri", "question", "answer",
                "history", "llava_prompt", "status", "stage", "reason", "raw", "objects")


def _base_item(source: str, record_id: str, turn: int, raw: str = "") -> dict[str, Any]:
    return {
        "order": -1, "shard": -1, "item_id": f"{record_id}#{turn}", "record_id": record_id, "turn": turn,
        "source": source, "image_uri": "", "question": "", "answer": "", "history": "[]",
        "llava_prompt": "", "status": "ok", "stage": "", "reason": "", "raw": raw, "objects": "",
    }


def _quarantined(source: str, record_id: str, reason: str, raw: str, turn: int = -1) -> dict[str, Any]:
    item = _base_item(source, record_id, turn, raw)
    item.update(status="quarantined", stage="read", reason=reason)
    if turn < 0:
        item["item_id"] = record_id
    return item


def list_source_files(source: str) -> list[str]:
    """The JSON/JSONL files of ``source``: the file itself, or those under a directory/prefix."""
    if not storage.exists(source):
        raise SourceError(f"source {source!r} does not exist")
    files = storage.list_files(source)
    if files == [source]:
        return files
    files = [f for f in files if f.endswith(SOURCE_SUFFIXES)]
    if not files:
        raise SourceError(f"source {source!r} holds no .json or .jsonl files")
    return files


def _iter_json_array(text: str) -> Iterator[tuple[int, Any, Optional[str]]]:
    """Yield ``(index, value, error)`` for a JSON array, recovering what precedes a syntax error.

    A truncated or corrupt tail becomes one final ``malformed_json`` entry instead of losing the
    whole file; a top-level object is one record.
    """
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:].startswith("["):
        try:
            yield 0, json.loads(text), None
        except json.JSONDecodeError as exc:
            yield 0, text[:RAW_CHARS], f"malformed_json: {exc}"
        return
    pos += 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        if pos >= len(text):
            yield index, "", "malformed_json: array not closed"
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield index, text[pos:pos + RAW_CHARS], f"malformed_json: {exc}"
            return
        yield index, value, None
        index += 1


def iter_jsonl_records(data: bytes, name: str, first_line: int = 1) -> Iterator[tuple[str, Any, Optional[str]]]:
    """Yield ``(locator, record, error_reason)`` for the JSON Lines in ``data``.

    ``first_line`` numbers the first line of ``data`` (a byte range of a larger file starts
    after the lines of the ranges before it); blank lines are numbered but hold no record.
    """
    for n, line in enumerate(data.splitlines(), start=first_line):
        if not line.strip():
            continue
        locator = f"{name}:{n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield locator, line.decode("utf-8", errors="replace"), "non_utf8_text"
            continue
        try:
            yield locator, json.loads(text), None
        except json.JSONDecodeError:
            yield locator, text, "malformed_json"


def iter_json_records(data: bytes, name: str) -> Iterator[tuple[str, Any, Optional[str]]]:
    """Yield ``(locator, record, error_reason)`` for a whole ``.json`` file (array or one object)."""
    text = data.decode("utf-8", errors="surrogateescape")
    for index, value, error in _iter_json_array(text):
        yield f"{name}[{index}]", value, ("malformed_json" if error else None)


def _iter_records(uri: str) -> Iterator[tuple[str, Any, Optional[str]]]:
    """Yield ``(locator, record, error_reason)`` for every record of one source file."""
    data = storage.read_bytes(uri)
    name = PurePosixPath(uri).name
    if uri.endswith(".jsonl"):
        return iter_jsonl_records(data, name)
    return iter_json_records(data, name)


def file_stem_and_root(uri: str, images_root: Optional[str]) -> tuple[str, str]:
    """The default ``source`` name of a file's records and the root their images resolve against."""
    stem = PurePosixPath(uri).name.rsplit(".", 1)[0]
    root = images_root if images_root else uri.rsplit("/", 1)[0] if "/" in uri else "."
    return stem, root


def screen_record(stem: str, locator: str, record: Any, error: Optional[str]
                  ) -> tuple[str, Optional[str], Optional[dict[str, Any]]]:
    """``(source, record id, None)`` for a record that may be exploded, else ``(source, None, item)``
    with the one quarantined item that stands for it. Duplicate ids are the caller's to check."""
    if error:
        return stem, None, _quarantined(stem, locator, error, _raw(record))
    if not isinstance(record, dict):
        return stem, None, _quarantined(stem, locator, "not_an_object", _raw(record))
    if _has_surrogates(record):
        return stem, None, _quarantined(stem, locator, "non_utf8_text", _raw(record))
    rid, reason = _record_id(record)
    src = record.get("source") if isinstance(record.get("source"), str) and record.get("source") else stem
    if reason:
        return src, None, _quarantined(src, locator, reason, _raw(record))
    return src, rid, None


def duplicate_item(source: str, record_id: str, locator: str, record: Any) -> dict[str, Any]:
    """The quarantined item of a record whose id an earlier record of the source already has."""
    return _quarantined(source, f"{record_id}@{locator}", "duplicate_id", _raw(record))


def _record_id(record: dict) -> tuple[Optional[str], Optional[str]]:
    rid = record.get("id")
    if rid is None or rid == "":
        return None, "missing_id"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None, "bad_id_type"
    return str(rid), None


def _image_field(record: dict) -> tuple[Optional[str], Optional[str]]:
    image = record.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            return None, "multiple_images" if image else "missing_image_field"
        image = image[0]
    if image is None or image == "":
        return None, "missing_image_field"
    if not isinstance(image, str):
        return None, "bad_image_type"
    return image, None


def _turns(conversations: Any) -> tuple[Optional[list[tuple[str, str]]], Optional[str]]:
    """``[(role, text)]`` with roles normalised to human/gpt, or a structural error reason."""
    if conversations is None:
        return None, "missing_conversations"
    if not isinstance(conversations, list):
        return None, "bad_conversations_type"
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict):
            return None, "malformed_turn"
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or not isinstance(value, str):
            return None, "malformed_turn"
        role = role.lower()
        if role in SKIPPED_ROLES:
            continue
        if role in HUMAN_ROLES:
            turns.append(("human", value))
        elif role in ANSWER_ROLES:
            turns.append(("gpt", value))
        else:
            return None, "unknown_role"
    if not turns:
        return None, "empty_conversations"
    if turns[0][0] != "human":
        return None, "answer_without_question"
    return turns, None


def record_objects(record: dict) -> str:
    """The record's optional ``objects`` annotation (the bias world's scene objects) as a JSON list
    of strings, or ``""`` when absent or not a list of strings (the on-policy annotations verifier
    then falls back to an annotations file, or reports ``no_annotations``)."""
    objs = record.get("objects")
    if isinstance(objs, list) and all(isinstance(o, str) for o in objs):
        return json.dumps(sorted(set(objs)))
    return ""


def explode_record(record: dict, source: str, images_root: Optional[str], max_text_chars: int,
                   record_id: str) -> list[dict[str, Any]]:
    """Items of one structurally valid record: one per human turn, each with its history.

    A human turn with no answer after it, an empty question or answer, or an over-long text is
    quarantined on its own; later turns keep the earlier ones (answered) as history.
    """
    raw = _raw(record)
    image, reason = _image_field(record)
    if reason:
        return [_quarantined(source, record_id, reason, raw)]
    turns, reason = _turns(record.get("conversations"))
    if reason:
        return [_quarantined(source, record_id, reason, raw)]
    image_uri = resolve_image_uri(image, images_root)
    if not storage.is_remote(image_uri):
        image_uri = os.path.abspath(os.path.expanduser(image_uri))
    items: list[dict[str, Any]] = []
    history: list[tuple[str, str]] = []
    k = 0
    i = 0
    while i < len(turns):
        role, question = turns[i]
        if role != "human":  # two answers in a row: the extra one has no question
            items.append(_quarantined(source, record_id, "answer_without_question", raw, turn=k))
            k += 1
            i += 1
            continue
        answer = turns[i + 1][1] if i + 1 < len(turns) and turns[i + 1][0] == "gpt" else None
        item = _base_item(source, record_id, k, raw)
        item["image_uri"] = image_uri
        q = strip_image_token(question)
        if answer is None:
            item.update(status="quarantined", stage="read", reason="missing_answer")
        elif not q:
            item.update(status="quarantined", stage="read", reason="empty_question")
        elif not answer.strip():
            item.update(status="quarantined", stage="read", reason="empty_answer")
        elif len(q) > max_text_chars or len(answer) > max_text_chars:
            item.update(status="quarantined", stage="read", reason="text_too_long")
        else:
            answer = answer.strip()
            item.update(question=q, answer=answer, history=json.dumps(history),
                        llava_prompt=build_prompt(q, history), raw="", objects=record_objects(record))
            history = history + [(q, answer)]
        items.append(item)
        k += 1
        i += 2 if answer is not None else 1
    return items


def count_items(record: dict) -> int:
    """How many items ``explode_record`` makes of ``record`` (same walk, nothing built)."""
    if _image_field(record)[1]:
        return 1
    turns, reason = _turns(record.get("conversations"))
    if reason:
        return 1
    k = i = 0
    while i < len(turns):
        if turns[i][0] != "human":
            i += 1
        else:
            i += 2 if i + 1 < len(turns) and turns[i + 1][0] == "gpt" else 1
        k += 1
    return k


def read_source(source: str, images_root: Optional[str] = None, max_text_chars: int = 20000,
                max_items: Optional[int] = None, sample_items: Optional[int] = None,
                seed: int = 0) -> SourceRead:
    """Read every record of ``source`` (file, directory or prefix; local or s3://) into items.

    ``images_root`` resolves relative ``image`` fields; by default, the source file's folder.
    ``sample_items`` keeps a seeded uniform sample of that many items (in source order), then
    ``max_items`` keeps the first that many.
    Items get a global ``order`` (stable for the same input) used for sharding and resume.
    """
    files = list_source_files(source)
    out = SourceRead(files=files)
    seen: set[str] = set()
    for uri in files:
        stem, root = file_stem_and_root(uri, images_root)
        try:
            records = list(_iter_records(uri))
        except storage.StorageError as exc:
            raise SourceError(f"cannot read source file {uri}: {exc}") from exc
        for locator, record, error in records:
            src, rid, bad = screen_record(stem, locator, record, error)
            if bad is not None:
                out.items.append(bad)
                continue
            if rid in seen:
                out.items.append(duplicate_item(src, rid, locator, record))
                continue
            seen.add(rid)
            out.items.extend(explode_record(record, src, root, max_text_chars, rid))
    if sample_items is not None and sample_items < len(out.items):
        keep = sorted(random.Random(seed).sample(range(len(out.items)), sample_items))
        out.items = [out.items[i] for i in keep]
    if max_items is not None:
        out.items = out.items[:max_items]
    for order, item in enumerate(out.items):
        item["order"] = order
    return out


def assign_shards(items: list[dict[str, Any]], shard_size: int) -> int:
    """Set each item's ``shard`` from its order; returns the number of shards."""
    for item in items:
        item["shard"] = item["order"] // shard_size
    return (len(items) + shard_size - 1) // shard_size
