"""Scenes of the bias world: sampling, rendering, and LLaVA-format records about them.

A scene is a few coloured shapes on a 3x3 grid. Kinds are sampled *independently* (each kind is
present with the same base rate), so the prior partner of a present object is there only at that
base rate; the text corpus (``bpo_ray.world.corpus``) says otherwise, which is what the tiny MLLM
learns to hallucinate from.

Records follow the LLaVA conversation format used by ShareGPT4V, LLaVA-Instruct and LLaVAR, the
BPO paper's sources: ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``, plus two extra keys: ``objects`` (canonical kinds present,
the ground truth for CHAIR/POPE) and ``source`` (``caption`` | ``vqa`` | ``conversation``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from PIL import Image, ImageDraw

from bpo_ray.world import vocab

IMAGE_TOKEN = "<image>"
RECORD_SOURCES: tuple[str, ...] = ("caption", "vqa", "conversation")
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "Give a detailed description of the image.",
    "What do you see in this picture? Describe it in detail.",
)
COUNT_WEIGHTS: tuple[float, ...] = (0.6, 0.25, 0.15)  # P(count = 1, 2, 3) for a present kind


class SceneObject(NamedTuple):
    kind: str
    colour: str
    position: str


class ObjectGroup(NamedTuple):
    """All instances of one kind in a scene; every instance of a kind shares one colour."""

    kind: str
    colour: str
    positions: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class Scene:
    id: str
    objects: tuple[SceneObject, ...]  # in reading order of their grid cells

    @property
    def kinds(self) -> list[str]:
        """Canonical kinds present, sorted."""
        return sorted({obj.kind for obj in self.objects})

    @property
    def groups(self) -> list[ObjectGroup]:
        """One group per kind, ordered by the first cell the kind occupies."""
        by_kind: dict[str, list[SceneObject]] = {}
        for obj in self.objects:
            by_kind.setdefault(obj.kind, []).append(obj)
        return [
            ObjectGroup(kind, objs[0].colour, tuple(o.position for o in objs)) for kind, objs in by_kind.items()
        ]


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_independent_kinds(rng: random.Random, object_rate: float = 0.15, max_kinds: int = 6) -> list[str]:
    """Each kind present independently with probability ``object_rate``; 1..max_kinds kinds.

    Rejecting empty and over-full draws (1-2% of them at the defaults) moves P(partner | kind) only
    slightly off the base rate (0.149 vs 0.166 measured), far from the corpus's ~0.9. A tight
    ``max_kinds`` (e.g. 4) would push it down noticeably.
    """
    while True:
        kinds = [kind for kind in vocab.OBJECT_KINDS if rng.random() < object_rate]
        if 1 <= len(kinds) <= max_kinds:
            return kinds


def place_objects(rng: random.Random, kinds: Sequence[str], max_objects: int = 6) -> tuple[SceneObject, ...]:
    """Give each kind a colour, a count (1-3) and distinct grid cells; returns objects in cell order.

    Counts are redrawn (never the kinds) when they overflow ``max_objects``, so which kinds are
    present stays exactly as sampled.
    """
    if len(kinds) > min(max_objects, len(vocab.POSITIONS)):
        raise ValueError(f"{len(kinds)} kinds do not fit in {max_objects} objects")
    colours = {kind: rng.choice(list(vocab.COLOURS)) for kind in kinds}
    while True:
        counts = {kind: rng.choices(vocab.COUNTS, weights=COUNT_WEIGHTS)[0] for kind in kinds}
        if sum(counts.values()) <= min(max_objects, len(vocab.POSITIONS)):
            break
    instance_kinds = [kind for kind in kinds for _ in range(counts[kind])]
    cells = rng.sample(range(len(vocab.POSITIONS)), len(instance_kinds))
    placed = sorted(zip(cells, instance_kinds))
    return tuple(SceneObject(kind, colours[kind], vocab.POSITIONS[cell]) for cell, kind in placed)


def sample_scene(
    rng: random.Random,
    scene_id: str = "scene",
    object_rate: float = 0.15,
    max_kinds: int = 6,
    max_objects: int = 6,
) -> Scene:
    """A scene whose kinds ignore the prior pairs (see ``sample_independent_kinds``)."""
    kinds = sample_independent_kinds(rng, object_rate, max_kinds)
    return Scene(scene_id, place_objects(rng, kinds, max_objects))


def with_prior_partners(scene: Scene, rng: random.Random, rate: float, max_kinds: int = 6,
                        max_objects: int = 6) -> Scene:
    """``scene`` where each present kind's absent prior partner is added w.p. ``rate`` (while
    ``max_kinds`` and ``max_objects`` allow), objects placed afresh: a scene that follows the prior."""
    partners = vocab.prior_partners()
    kinds = list(scene.kinds)
    for kind in list(kinds):
        if partners[kind] not in kinds and len(kinds) < min(max_kinds, max_objects) and rng.random() < rate:
            kinds.append(partners[kind])
    if len(kinds) == len(scene.kinds):
        return scene
    return Scene(scene.id, place_objects(rng, sorted(kinds), max_objects))


# ---------------------------------------------------------------------------------------------
# Rendering

Box = tuple[int, int, int, int]


def _bar(draw: ImageDraw.ImageDraw, box: Box, fill: tuple[int, int, int], horizontal: bool) -> None:
    x0, y0, x1, y1 = box
    if horizontal:
        half = max(1, (y1 - y0) // 6)
        cy = (y0 + y1) // 2
        draw.rectangle((x0, cy - half, x1, cy + half), fill=fill)
    else:
        half = max(1, (x1 - x0) // 6)
        cx = (x0 + x1) // 2
        draw.rectangle((cx - half, y0, cx + half, y1), fill=fill)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    stroke = max(2, (x1 - x0 + 1) // 4)
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "flat_bar":
        _bar(draw, box, fill, horizontal=True)
    elif shape == "tall_bar":
        _bar(draw, box, fill, horizontal=False)
    elif shape == "diagonal":
        draw.line((x0, y1, x1, y0), fill=fill, width=stroke)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=stroke)
    elif shape == "plus":
        _bar(draw, box, fill, horizontal=True)
        _bar(draw, box, fill, horizontal=False)
    elif shape == "triangle_up":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "hollow_square":
        draw.rectangle(box, outline=fill, width=stroke)
    elif shape == "triangle_down":
        draw.polygon([(x0, y0), (x1, y0), (cx, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        draw.line((x0, y0, x1, y1), fill=fill, width=stroke)
        draw.line((x0, y1, x1, y0), fill=fill, width=stroke)
    elif shape == "half_disc":
        draw.pieslice((x0, y0, x1, y1 + (y1 - y0)), 180, 360, fill=fill)
    elif shape == "tee":
        draw.rectangle((x0, y0, x1, y0 + stroke - 1), fill=fill)
        half = max(1, (x1 - x0) // 6)
        draw.rectangle((cx - half, y0, cx + half, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def cell_box(position: str, size: int) -> Box:
    """Pixel box (inclusive) of a grid cell, shrunk by a margin so neighbours never touch."""
    index = vocab.POSITIONS.index(position)
    row, col = divmod(index, 3)
    x0, x1 = round(col * size / 3), round((col + 1) * size / 3) - 1
    y0, y1 = round(row * size / 3), round((row + 1) * size / 3) - 1
    margin = max(1, round(size / 3 * 0.12))
    return x0 + margin, y0 + margin, x1 - margin, y1 - margin


def render_scene(scene: Scene, size: int = 32) -> Image.Image:
    """Deterministic RGB render: no antialiasing, no randomness, same scene -> same pixels."""
    image = Image.new("RGB", (size, size), vocab.BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, vocab.SHAPE_OF_KIND[obj.kind], cell_box(obj.position, size), vocab.COLOURS[obj.colour])
    return image


# ---------------------------------------------------------------------------------------------
# Text about a scene


def _join_phrases(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe_group(group: ObjectGroup) -> str:
    """'There is a red cup on the left.' / 'There are two blue dogs, at the top and on the right.'"""
    phrases = [vocab.POSITION_PHRASES[p] for p in group.positions]
    if group.count == 1:
        article = vocab.indefinite_article(group.colour)
        return f"There is {article} {group.colour} {group.kind} {phrases[0]}."
    number = vocab.COUNT_WORDS[group.count]
    return f"There are {number} {group.colour} {vocab.plural_of(group.kind)}, {_join_phrases(phrases)}."


def describe_scene(scene: Scene) -> str:
    """The detailed caption: one sentence per kind, in reading order. The corpus uses the same style."""
    return " ".join(describe_group(group) for group in scene.groups)


def list_objects(scene: Scene) -> str:
    """'A red cup and two blue dogs.'"""
    parts = []
    for group in scene.groups:
        if group.count == 1:
            parts.append(f"{vocab.indefinite_article(group.colour)} {group.colour} {group.kind}")
        else:
            parts.append(f"{vocab.COUNT_WORDS[group.count]} {group.colour} {vocab.plural_of(group.kind)}")
    return _sentence_case(_join_phrases(parts)) + "."


QuestionAnswer = tuple[str, str]


def colour_question(scene: Scene, rng: random.Random) -> QuestionAnswer:
    group = rng.choice(scene.groups)
    if group.count == 1:
        return f"What colour is the {group.kind}?", _sentence_case(group.colour) + "."
    return f"What colour are the {vocab.plural_of(group.kind)}?", _sentence_case(group.colour) + "."


def count_question(scene: Scene, rng: random.Random) -> QuestionAnswer:
    group = rng.choice(scene.groups)
    return f"How many {vocab.plural_of(group.kind)} are there?", _sentence_case(vocab.COUNT_WORDS[group.count]) + "."


def existence_question(scene: Scene, rng: random.Random) -> QuestionAnswer:
    """Half present, half absent; absent kinds are drawn uniformly (not the prior partner)."""
    present = scene.kinds
    absent = [kind for kind in vocab.OBJECT_KINDS if kind not in present]
    if rng.random() < 0.5 or not absent:
        kind, is_present = rng.choice(present), True
    else:
        kind, is_present = rng.choice(absent), False
    return f"Is there {vocab.indefinite_article(kind)} {kind} in the image?", vocab.existence_answer(kind, is_present)


def position_question(scene: Scene, rng: random.Random) -> QuestionAnswer:
    group = rng.choice(scene.groups)
    where = _sentence_case(_join_phrases([vocab.POSITION_PHRASES[p] for p in group.positions])) + "."
    if group.count == 1:
        return f"Where is the {group.kind}?", where
    return f"Where are the {vocab.plural_of(group.kind)}?", where


def listing_question(scene: Scene, rng: random.Random) -> QuestionAnswer:
    return "What objects are in the image?", list_objects(scene)


SHORT_QUESTIONS: dict[str, Callable[[Scene, random.Random], QuestionAnswer]] = {
    "colour": colour_question,
    "count": count_question,
    "existence": existence_question,
    "position": position_question,
}
CONVERSATION_QUESTIONS: dict[str, Callable[[Scene, random.Random], QuestionAnswer]] = {
    **SHORT_QUESTIONS,
    "listing": listing_question,
}


def _record(record_id: str, image: str, turns: Sequence[QuestionAnswer], scene: Scene, source: str) -> dict[str, Any]:
    conversations = []
    for index, (question, answer) in enumerate(turns):
        value = f"{IMAGE_TOKEN}\n{question}" if index == 0 else question
        conversations.append({"from": "human", "value": value})
        conversations.append({"from": "gpt", "value": answer})
    return {
        "id": record_id,
        "image": image,
        "conversations": conversations,
        "objects": scene.kinds,
        "source": source,
    }


def caption_record(scene: Scene, image: str, rng: random.Random) -> dict[str, Any]:
    """Detailed-caption record (ShareGPT4V-like)."""
    return _record(f"{scene.id}-caption", image, [(rng.choice(CAPTION_PROMPTS), describe_scene(scene))], scene, "caption")


def vqa_record(scene: Scene, image: str, rng: random.Random) -> dict[str, Any]:
    """One short question: colour, count, existence (yes/no) or position (VQA-like)."""
    ask = SHORT_QUESTIONS[rng.choice(list(SHORT_QUESTIONS))]
    return _record(f"{scene.id}-vqa", image, [ask(scene, rng)], scene, "vqa")


def conversation_record(scene: Scene, image: str, rng: random.Random) -> dict[str, Any]:
    """Two or three turns of different question types (LLaVA-Instruct-like)."""
    names = rng.sample(list(CONVERSATION_QUESTIONS), rng.choice((2, 3)))
    turns = [CONVERSATION_QUESTIONS[name](scene, rng) for name in names]
    return _record(f"{scene.id}-conversation", image, turns, scene, "conversation")


RECORD_BUILDERS: dict[str, Callable[[Scene, str, random.Random], dict[str, Any]]] = {
    "caption": caption_record,
    "vqa": vqa_record,
    "conversation": conversation_record,
}


def records_for_scene(
    scene: Scene, image: str, rng: random.Random, sources: Sequence[str] = RECORD_SOURCES
) -> list[dict[str, Any]]:
    """One record per requested source, all pointing at the same ``image`` path."""
    return [RECORD_BUILDERS[source](scene, image, rng) for source in sources]
