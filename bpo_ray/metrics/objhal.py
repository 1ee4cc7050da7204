"""Object HalBench scores as RLHF-V / RLAIF-V compute them (rule path, no GPT).

Reference: ``eval/eval_gpt_obj_halbench.py`` of https://github.com/RLHF-V/RLAIF-V (identical in
RLHF-V/RLHF-V), the scorer behind the "Resp." / "Ment." columns of RLHF-V, RLAIF-V and BPO. Per
answer it

1. lower-cases the answer and tokenizes it with ``nltk.word_tokenize`` (Treebank rules);
2. lemmatizes every token with NLTK's WordNet lemmatizer (noun morphy, ``bpo_ray.metrics.wordnet``);
3. joins two-word phrases left to right: every multi-word form of ``synonyms_refine.txt``, "home
   plate", "train track", "baby"/"adult" + animal = the animal, "passenger jet/train" = the
   vehicle, "bow tie" = tie, "toilet seat" = toilet, "wine glas" = wine glass;
4. drops every "seat" when the answer also names a toilet;
5. keeps tokens that are ``synonyms_refine.txt`` forms, each mapped to its line's first entry.

Truth per image: COCO instance categories plus the objects its human captions name (through the
same steps). Metrics (``compute_chair``):

* ``CHAIRs`` = hallucinating answers / all answers;
* ``CHAIRs_refine`` = hallucinating answers / answers that mention at least one COCO object: the
  response-level rate ("Resp.") the papers print;
* ``CHAIRi`` = hallucinated mentions / all mentions (repeats count): "Ment." / "Obj.";
* ``obj_rec`` = per answer, distinct correctly mentioned objects, summed / truth objects summed.

Unlike Rohrbach's ``chair.py`` there is no singularizer: WordNet gives "bus" (not "bu") and "ties"
-> "tie"; the synonym forms are stripped. This module writes those steps itself (no reference code
copied); the tokenizer is ``bpo_ray.metrics.nltk_tokenize`` (NLTK 3.8.1 rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from bpo_ray.metrics.nltk_tokenize import word_tokenize
from bpo_ray.metrics.rohrbach import merge_two_word_objects
from bpo_ray.metrics.wordnet import NounLemmatizer

_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")


@dataclass(frozen=True)
class ObjHalWords:
    """One answer read as the reference reads it (the reference's ``caption_to_words`` outputs)."""

    tokens: list[str]  # lemmatized tokens after two-word joining ("words" in the reference output)
    words: list[str]  # the vocabulary forms found, in order
    objects: list[str]  # their canonical COCO objects
    positions: list[int]  # index of each found form in ``tokens`` counted as the reference does


class ObjHalExtractor:
    """COCO object mentions of an answer, as RLAIF-V's Object HalBench scorer finds them."""

    def __init__(self, synonym_lines: Iterable[str], lemmatizer: NounLemmatizer):
        self.lemmatizer = lemmatizer
        self.synonyms: dict[str, str] = {}
        for line in synonym_lines:
            forms = [form.strip() for form in line.strip().split(", ")]
            if not forms or not forms[0]:
                continue
            for form in forms:
                self.synonyms[form] = forms[0]
        pairs = {w: w for w in self.synonyms if len(w.strip().split(" ")) >= 2}
        pairs.update({"home plate": "home plate", "train track": "train track"})
        for animal in _ANIMALS:
            pairs[f"baby {animal}"] = animal
            pairs[f"adult {animal}"] = animal
        pairs.update({"passenger jet": "jet", "passenger train": "train", "bow tie": "tie",
                      "toilet seat": "toilet", "wine glas": "wine glass"})
        self.pairs = pairs

    def caption_words(self, answer: str) -> ObjHalWords:
        lemmas = [self.lemmatizer.lemmatize(token) for token in word_tokenize(answer.lower())]
        # ``starts``: the reference records the loop index of *every* step here
        tokens, starts = merge_two_word_objects(lemmas, self.pairs)
        kept = tokens
        if "toilet" in kept and "seat" in kept:
            kept = [t for t in kept if t != "seat"]
        # As the reference: positions index ``starts`` by the position in the seat-filtered list.
        positions = [starts[k] for k, t in enumerate(kept) if t in self.synonyms]
        words = [t for t in kept if t in self.synonyms]
        return ObjHalWords(tokens, words, [self.synonyms[w] for w in words], positions)

    def canonical(self, name: str) -> str:
        """The canonical object of a COCO category name (the reference looks it up unprocessed)."""
        try:
            return self.synonyms[name]
        except KeyError:
            raise ValueError(f"COCO category {name!r} is not a form in the synonyms file") from None


@dataclass
class ObjHalItem:
    answer: str
    ground_truth: list[str]
    mentioned: list[str]  # canonical objects, repeats kept
    hallucinated: list[str]

    @property
    def mentions_coco(self) -> bool:
        return bool(self.mentioned)

    @property
    def is_hallucinated(self) -> bool:
        return bool(self.hallucinated)


@dataclass
class ObjHalReport:
    items: list[ObjHalItem] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """The reference's ``overall_metrics`` (its float arithmetic, in its order); rates with an
        empty denominator, where the reference divides by zero, are ``nan``."""
        n = float(len(self.items))
        n_coco = float(sum(item.mentions_coco for item in self.items))
        n_hall = float(sum(item.is_hallucinated for item in self.items))
        mentions = float(sum(len(item.mentioned) for item in self.items))
        hallucinated = float(sum(len(item.hallucinated) for item in self.items))
        correct_classes = float(sum(len({m for m in item.mentioned if m in item.ground_truth}) for item in self.items))
        truth = float(sum(len(item.ground_truth) for item in self.items))
        words = sum(len(item.answer.strip().split(" ")) for item in self.items)
        div = lambda a, b: a / b if b else float("nan")  # noqa: E731
        chair_s_refine = div(n_hall, n_coco)
        chair_i = div(hallucinated, mentions)
        return {"CHAIRs": div(n_hall, n), "CHAIRs_refine": chair_s_refine, "CHAIRi": chair_i,
                "obj_rec": div(correct_classes, truth), "sentence_num": n, "coco_sentence_num": n_coco,
                "coco_word_count": correct_classes, "gt_word_count": truth, "avg_word_len": div(float(words), n),
                "correct_rate": 1 - chair_s_refine, "object_correct_rate": 1 - chair_i}


def clean_answer(text: str) -> str:
    """The reference's reading of an answer file's ``text``/``answer``: "Assistant:" removed, stripped."""
    return text.replace("Assistant:", "").strip()


def score_answer(answer: str, ground_truth: Iterable[str], extractor: ObjHalExtractor) -> ObjHalItem:
    truth = sorted(set(ground_truth))
    found = extractor.caption_words(answer)
    return ObjHalItem(answer, truth, list(found.objects), [o for o in found.objects if o not in truth])


def score_listed(answer: str, listed: Sequence[str], ground_truth: Iterable[str], extractor: ObjHalExtractor) -> ObjHalItem:
    """An answer scored from the objects a judge listed for it (the reference's ``--use_gpt`` path:
    GPT lists the objects, which are then lemmatized and mapped to COCO objects). Each listed name
    is read on its own by the rule path (WordNet lemmas here, spaCy ``en_core_web_trf`` there), so
    "dog", "leash" do not join into the phrase "dog leash"."""
    truth = sorted(set(ground_truth))
    objects = [obj for name in listed for obj in extractor.caption_words(name).objects]
    return ObjHalItem(answer, truth, objects, [o for o in objects if o not in truth])


def score_objhal(answers: Sequence[str], truths: Sequence[Iterable[str]], extractor: ObjHalExtractor) -> ObjHalReport:
    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answers but {len(truths)} ground-truth lists")
    return ObjHalReport([score_answer(a, t, extractor) for a, t in zip(answers, truths)])


def coco_objhal_truth(instances: Mapping, captions: Optional[Mapping], extractor: ObjHalExtractor,
                      image_ids: Optional[Iterable[int]] = None) -> dict[int, set[str]]:
    """Canonical objects per image id: instance categories + objects the human captions name.

    ``image_ids`` limits the result (and the work) to those images, as the reference's
    ``imid_to_objects`` does; every one of them is present, possibly empty.
    """
    wanted = set(image_ids) if image_ids is not None else {img["id"] for img in instances.get("images", [])}
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    truth: dict[int, set[str]] = {image_id: set() for image_id in wanted}
    for ann in instances.get("annotations", []):
        if ann.get("image_id") in truth and ann.get("category_id") in names:
            truth[ann["image_id"]].add(extractor.canonical(names[ann["category_id"]]))
    for ann in (captions or {}).get("annotations", []):
        if ann.get("image_id") in truth:
            truth[ann["image_id"]].update(extractor.caption_words(ann.get("caption", "")).objects)
    return truth
