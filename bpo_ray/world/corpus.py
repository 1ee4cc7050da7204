"""A text corpus whose object co-occurrence obeys the prior pairs that the scenes ignore.

Each line is a caption in exactly the style of ``describe_scene`` for an unrendered "prior scene":
kinds are drawn pair by pair, and when one kind of a pair is mentioned its partner is mentioned
with probability ``partner_rate`` (0.9 by default). Pretraining the tiny language model on this
text plants the language prior; the scene data (independent kinds) never confirms it, so the
resulting MLLM hallucinates the partner, as LLaVA hallucinates a saucer under a cup.
"""

from __future__ import annotations

import random
from typing import Collection, Iterable, Sequence

from bpo_ray.models.prompts import text_prompt
from bpo_ray.world import vocab
from bpo_ray.world.scenes import (
    CAPTION_PROMPTS,
    SHORT_QUESTIONS,
    ObjectGroup,
    Scene,
    SceneObject,
    describe_scene,
    place_objects,
    sample_scene,
)


def both_of_pair_probability(partner_rate: float) -> float:
    """P(both kinds of a pair | the pair is mentioned) that makes P(partner | kind) = partner_rate.

    With both mentioned w.p. q and each single kind w.p. (1 - q) / 2:
    P(partner | kind) = q / (q + (1 - q) / 2) = 2q / (1 + q), so q = r / (2 - r).
    """
    if not 0.0 <= partner_rate <= 1.0:
        raise ValueError(f"partner_rate must be in [0, 1], got {partner_rate}")
    return partner_rate / (2.0 - partner_rate)


def sample_prior_kinds(
    rng: random.Random, partner_rate: float = 0.9, pair_rate: float = 0.15, max_kinds: int = 6
) -> list[str]:
    """Kinds of one prior scene: each pair mentioned w.p. ``pair_rate``, partners together mostly."""
    both = both_of_pair_probability(partner_rate)
    while True:
        kinds: list[str] = []
        for first, second in vocab.PRIOR_PAIRS:
            if rng.random() >= pair_rate:
                continue
            if rng.random() < both:
                kinds.extend((first, second))
            else:
                kinds.append(rng.choice((first, second)))
        if 1 <= len(kinds) <= max_kinds:
            return kinds


def sample_prior_scene(rng: random.Random, scene_id: str = "prior", partner_rate: float = 0.9) -> Scene:
    """A scene that obeys the prior; only ever written as text."""
    kinds = sample_prior_kinds(rng, partner_rate)
    return Scene(scene_id, place_objects(rng, kinds, max_objects=len(vocab.POSITIONS)))


def sample_prior_scenes(n_lines: int, seed: int = 0, partner_rate: float = 0.9) -> list[Scene]:
    """The prior scenes behind ``build_corpus`` (same seed, same scenes), for measuring statistics."""
    rng = random.Random(f"bias-world-corpus:{seed}")
    return [sample_prior_scene(rng, f"prior-{i}", partner_rate) for i in range(n_lines)]


def build_corpus(n_lines: int = 20000, seed: int = 0, partner_rate: float = 0.9) -> list[str]:
    """``n_lines`` captions, deterministic from ``seed``; one caption per line."""
    return [describe_scene(scene) for scene in sample_prior_scenes(n_lines, seed, partner_rate)]


def prior_typical_partner() -> dict[str, str]:
    """Each kind -> the partner the corpus pairs it with (what a prior-driven hallucination names)."""
    return vocab.prior_partners()


def partner_cooccurrence(kind_sets: Iterable[Collection[str]]) -> dict[str, float]:
    """How often the prior partner accompanies a kind, against how often any kind appears at all.

    ``partner_given_kind`` pools all kinds: #(kind and its partner present) / #(kind present).
    ``base_rate`` is the mean over kinds of P(kind present). Independent scenes give
    partner_given_kind ~= base_rate; the corpus gives ~= its ``partner_rate``.
    """
    partners = vocab.prior_partners()
    n_sets = with_kind = with_both = 0
    presence = {kind: 0 for kind in vocab.OBJECT_KINDS}
    for kinds in kind_sets:
        present = set(kinds)
        n_sets += 1
        for kind in present:
            presence[kind] += 1
            with_kind += 1
            with_both += partners[kind] in present
    base_rate = sum(presence.values()) / (len(presence) * n_sets) if n_sets else 0.0
    return {
        "partner_given_kind": with_both / with_kind if with_kind else 0.0,
        "base_rate": base_rate,
    }


# ---------------------------------------------------------------------------------------------
# Documents that teach the text LM its two jobs: the chat format, and error injection (Table 1).

ERROR_INJECTION_INSTRUCTION = (
    "I will give you a question and a response about an image. Pretend that you can see the image. "
    "You must modify the response by changing the original details, such as adding more objects or "
    "change the attributes of objects. Note that the modified responses should still be common in reality."
)
"""The head of the BPO paper's Table 1 prompt, kept verbatim; its few-shot examples
follow in the generate stage's full prompt, and here the examples are bias-world ones."""

ERROR_INJECTION_EXAMPLE = "Question: {question} Response: {response} Modified response: {modified}"
"""One few-shot example of Table 1; a prompt ends with ``Modified response:`` and the LM goes on."""


def inject_prior_errors(scene: Scene, rng: random.Random, add_partner_rate: float = 0.7) -> Scene:
    """The scene a prior-driven liar would describe: absent prior partners of present kinds are
    added (w.p. ``add_partner_rate`` each, where a cell is free), and one colour or count changes.

    These are the paper's error types (object existence, attributes, counts), drawn the way the
    corpus prior would draw them. Always differs from ``scene``.
    """
    partners = vocab.prior_partners()
    groups = {group.kind: group for group in scene.groups}
    free = [p for p in vocab.POSITIONS if p not in {obj.position for obj in scene.objects}]
    rng.shuffle(free)
    for kind in list(groups):
        partner = partners[kind]
        if partner not in groups and free and rng.random() < add_partner_rate:
            groups[partner] = scene_group(partner, rng.choice(list(vocab.COLOURS)), (free.pop(),))
    changed = len(groups) > len(scene.groups)
    if not changed or rng.random() < 0.5:
        kind = rng.choice(sorted(groups))
        group = groups[kind]
        if rng.random() < 0.6 or not free or group.count >= max(vocab.COUNTS):
            colour = rng.choice([c for c in vocab.COLOURS if c != group.colour])
            groups[kind] = scene_group(kind, colour, group.positions)
        else:
            groups[kind] = scene_group(kind, group.colour, group.positions + (free.pop(),))
    objects = [
        SceneObject(group.kind, group.colour, position) for group in groups.values() for position in group.positions
    ]
    objects.sort(key=lambda obj: vocab.POSITIONS.index(obj.position))
    return Scene(f"{scene.id}-modified", tuple(objects))


def scene_group(kind: str, colour: str, positions: tuple[str, ...]) -> ObjectGroup:
    return ObjectGroup(kind, colour, tuple(sorted(positions, key=vocab.POSITIONS.index)))


def _modified_short_answer(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """(question, true answer, modified answer) for a colour, count or existence question."""
    kind_of_question = rng.choice(("colour", "count", "existence"))
    question, answer = SHORT_QUESTIONS[kind_of_question](scene, rng)
    if kind_of_question == "colour":
        true_colour = answer.rstrip(".").lower()
        other = rng.choice([c for c in vocab.COLOURS if c != true_colour])
        return question, answer, other.capitalize() + "."
    if kind_of_question == "count":
        true_count = answer.rstrip(".").lower()
        other = rng.choice([w for w in vocab.COUNT_WORDS.values() if w != true_count])
        return question, answer, other.capitalize() + "."
    return question, answer, vocab.flip_existence_answer(answer)


def error_injection_example(rng: random.Random, scene_id: str = "injection") -> str:
    """One ``Question: .. Response: .. Modified response: ..`` example on a fresh (independent)
    scene: a detailed caption with prior-typical errors (60%) or a short answer flipped (40%)."""
    scene = sample_scene(rng, scene_id)
    if rng.random() < 0.6:
        question, response = rng.choice(CAPTION_PROMPTS), describe_scene(scene)
        modified = describe_scene(inject_prior_errors(scene, rng))
    else:
        question, response, modified = _modified_short_answer(scene, rng)
    return ERROR_INJECTION_EXAMPLE.format(question=question, response=response, modified=modified)


def error_injection_documents(n_documents: int, seed: int = 0, max_examples: int = 3) -> list[str]:
    """Table-1-format pretraining documents for the text LM, so it can do the injector's job.

    Each document is 1..``max_examples`` examples in a row (a few-shot prompt and its completion);
    a third start with the Table 1 instruction, and a third are wrapped in the chat roles of
    ``bpo_ray.models.prompts.text_prompt`` with the last modified response as the assistant turn.
    """
    rng = random.Random(f"bias-world-injection:{seed}")
    documents = []
    for index in range(n_documents):
        examples = [error_injection_example(rng, f"injection-{index}-{k}") for k in range(rng.randint(1, max_examples))]
        style = rng.random()
        if style < 1 / 3:
            documents.append(" ".join(examples))
        elif style < 2 / 3:
            documents.append(" ".join([ERROR_INJECTION_INSTRUCTION, *examples]))
        else:
            head, _, last = examples[-1].rpartition(" Modified response: ")
            shots = " ".join([ERROR_INJECTION_INSTRUCTION, *examples[:-1], head, "Modified response:"])
            documents.append(f"{text_prompt(shots)} {last}")
    return documents


def chat_prior_documents(captions: Sequence[str], seed: int = 0) -> list[str]:
    """Prior captions as chat turns (``USER: Describe ... ASSISTANT: <caption>``): the language
    prior in the answer format, as Vicuna carries its text prior into LLaVA's chat format."""
    rng = random.Random(f"bias-world-chat:{seed}")
    return [f"{text_prompt(rng.choice(CAPTION_PROMPTS))} {caption}" for caption in captions]


def existence_probe(present: Sequence[str], rng: random.Random) -> tuple[str, str]:
    """A POPE-style question and its answer about a scene holding the kinds ``present``: half about
    a present kind, half about an absent one, and half of those the absent prior partner of a
    present kind (the question the prior gets wrong)."""
    partners = vocab.prior_partners()
    absent = [k for k in vocab.OBJECT_KINDS if k not in present]
    absent_partners = [partners[k] for k in present if partners[k] not in present]
    if rng.random() < 0.5 or not absent:
        kind, is_present = rng.choice(list(present)), True
    else:
        kind, is_present = rng.choice(absent_partners if absent_partners and rng.random() < 0.5 else absent), False
    return f"Is there {vocab.indefinite_article(kind)} {kind} in the image?", vocab.existence_answer(kind, is_present)


def reading_documents(n_documents: int, seed: int = 0, partner_rate: float = 0.9, max_questions: int = 3) -> list[str]:
    """Reading comprehension over prior captions: ``USER: <caption> Is there a saucer? ASSISTANT: No.``

    A chat LM (Vicuna) can answer questions about a text in its context; this is that skill at
    toy size. Half the questions name a present kind, half an absent one (the absent prior partner
    of a present kind when there is one, half the time). The captions obey the prior, so the LM
    still learns that a saucer usually comes with a cup; it also learns to look before answering.
    """
    rng = random.Random(f"bias-world-reading:{seed}")
    documents = []
    for index in range(n_documents):
        scene = sample_prior_scene(rng, f"reading-{index}", partner_rate)
        present = scene.kinds
        turns = []
        for _ in range(rng.randint(1, max_questions)):
            turns.append(existence_probe(present, rng))
        first, *rest = turns
        text = f"USER: {describe_scene(scene)} {first[0]} ASSISTANT: {first[1]}"
        text += "".join(f" USER: {q} ASSISTANT: {a}" for q, a in rest)
        documents.append(text)
    return documents
