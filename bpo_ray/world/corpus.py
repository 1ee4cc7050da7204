"""A text corpus whose object co-occurrence obeys the prior pairs that the scenes ignore.

Each line is a caption in exactly the style of ``describe_scene`` for an unrendered "prior scene":
kinds are drawn pair by pair, and when one kind of a pair is mentioned its partner is mentioned
with probability ``partner_rate`` (0.9 by default). Pretraining the tiny language model on this
text plants the language prior; the scene data (independent kinds) never confirms it, so the
resulting MLLM hallucinates the partner, as LLaVA hallucinates a saucer under a cup.
"""

from __future__ import annotations

import random
from typing import Collection, Iterable

from bpo_ray.world import vocab
from bpo_ray.world.scenes import Scene, describe_scene, place_objects


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
