"""AMBER through the served model, scored as AMBER's ``inference.py`` scores it.

Inputs: AMBER's ``data/annotations.json`` (``{id, type, truth[, hallu]}``, id = position + 1), one
of its ``data/query/query_*.json`` files (``[{id, image, query}]``), ``images`` (AMBER_<n>.jpg),
and for the generative task ``relation.json`` and ``safe_words.txt``. Discriminative answers are
scored exactly as the reference does (only "Yes" / "No" count). Generative scoring needs a noun
extractor (NLTK with its tagger data, as the reference) and a similarity: ``similarity: spacy``
loads ``spacy_model`` (the reference's ``en_core_web_lg``, installed by the user); ``none`` uses
exact matches only and the metrics say so (not comparable with published AMBER numbers).
``nouns: every_token`` replaces the tagger (see ``every_token_nouns``).

``load_world``: the bias world's test split, written in AMBER's formats by
``bpo_ray.world.public_files`` and read by ``load`` like the real files.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

from bpo_ray import storage
from bpo_ray.config.evaluate import AmberSettings
from bpo_ray.metrics.amber import NounExtractor, Similarity, nltk_noun_extractor, score_discriminative, score_generative
from bpo_ray.evaluate.items import EvalItem, LoadedBenchmark, row_meta
from bpo_ray.evaluate.sources import BenchmarkDataError, read_json
from bpo_ray.images import resolve_image_uri

NAME = "amber"


def spacy_similarity(model: str) -> Similarity:
    """spaCy ``nlp(a).similarity(nlp(b))``, as the reference's ``check_synonyms_word``."""
    try:
        import spacy

        nlp = spacy.load(model)
    except (ImportError, OSError) as exc:
        raise RuntimeError(f"amber.similarity=spacy needs spaCy and its model {model!r} installed: {exc}") from exc
    return lambda a, b: float(nlp(a).similarity(nlp(b)))


def exact_only(a: str, b: str) -> float:
    return 0.0


def normalized_yes_no(answer: str) -> str:
    """bpo-ray's lenient reading, reported beside the official one: the first word that is "yes" or
    "no", punctuation and case ignored ("No, there is not." -> "No", "The cup yes." -> "Yes");
    an answer without one stays as it is (and counts as wrong)."""
    for word in answer.split():
        word = word.strip(".,!?;:\"'").lower()
        if word in ("yes", "no"):
            return word.capitalize()
    return answer


def every_token_nouns(wordnet_dir: Optional[str] = None) -> NounExtractor:
    """A noun finder without a tagger: every token (bpo-ray's NLTK 3.8.1 tokenizer) with its
    WordNet noun lemma. The generative scorer only looks at ``relation.json`` words, so this
    differs from the reference only where such a word is used as another part of speech ("a paper
    cup", "lock the door")."""
    from bpo_ray.metrics.nltk_tokenize import word_tokenize
    from bpo_ray.metrics.wordnet import NounLemmatizer

    lemmatizer = NounLemmatizer.from_dir(wordnet_dir)
    return lambda text: [lemmatizer.lemmatize(token) for token in word_tokenize(text)]


@functools.lru_cache(maxsize=4)
def generative_tools(similarity: str, spacy_model: str, wordnet: Optional[str],
                     nouns_mode: str = "nltk") -> tuple[NounExtractor, Similarity]:
    """The noun extractor (NLTK tagger + WordNet, as the reference, or ``every_token_nouns``) and
    the word similarity the generative scorer uses, built once per process and tried on a
    sentence, so a missing package or data file fails before any request is sent."""
    nouns = every_token_nouns(wordnet) if nouns_mode == "every_token" else nltk_noun_extractor(wordnet)
    nouns("A dog sits on a chair.")  # the tagger's data is only read on first use
    return nouns, (spacy_similarity(spacy_model) if similarity == "spacy" else exact_only)


def load_world(world_dir: str, settings: AmberSettings, max_items: Optional[int]) -> LoadedBenchmark:
    """The world's test scenes as AMBER files (``bpo_ray.world.public_files``), read by ``load``."""
    from bpo_ray.world.public_files import write_amber_files

    # The world's grammar uses its object words as nouns only, so no tagger is needed.
    update = {**write_amber_files(world_dir), "nouns": "every_token"}
    loaded = load(settings.model_copy(update=update), max_items)
    loaded.info["source"] = "world"
    return loaded


def load(settings: AmberSettings, max_items: Optional[int]) -> LoadedBenchmark:
    if not (settings.annotations and settings.queries and settings.images):
        raise BenchmarkDataError("amber needs evaluate.amber.annotations, queries and images")
    annotations = read_json(settings.annotations)
    queries = read_json(settings.queries)
    if not isinstance(annotations, list) or not isinstance(queries, list):
        raise BenchmarkDataError("amber: annotations.json and the query file must be JSON arrays")
    by_id = {a.get("id"): a for a in annotations if isinstance(a, dict)}
    info: dict[str, Any] = {"source": "amber", "similarity": settings.similarity, "spacy_model": settings.spacy_model,
                            "threshold": settings.similarity_threshold, "wordnet": settings.wordnet,
                            "nouns": settings.nouns}
    if settings.relation:
        info["relation"] = read_json(settings.relation)
    if settings.safe_words:
        info["safe_words"] = storage.read_text(settings.safe_words).split("\n")
    loaded = LoadedBenchmark(NAME, [], info)
    for query in queries:
        ann = by_id.get(query.get("id")) if isinstance(query, dict) else None
        if ann is None or not query.get("image") or not query.get("query"):
            loaded.skip("bad_amber_query", query)
            continue
        if ann.get("type") == "generative" and "relation" not in info:
            loaded.skip("generative_without_relation", query)
            continue
        if max_items and len(loaded.items) >= max_items:
            break
        if ann.get("type") == "generative" and not loaded.info.get("tools_checked"):
            try:
                generative_tools(settings.similarity, settings.spacy_model, settings.wordnet, settings.nouns)
            except (RuntimeError, LookupError, OSError) as exc:
                raise BenchmarkDataError(f"amber generative queries cannot be scored here: {exc}") from None
            loaded.info["tools_checked"] = True
        meta = {"amber_id": ann["id"], "type": ann["type"], "truth": ann["truth"], "hallu": ann.get("hallu", [])}
        loaded.items.append(EvalItem(f"{NAME}/{ann['id']}", NAME, resolve_image_uri(query["image"], settings.images),
                                     query["query"], category=ann["type"], meta=meta))
    return loaded


def score(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], similarity: Optional[Similarity] = None,
          nouns: Optional[NounExtractor] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Printed AMBER numbers: ``discriminative`` (all / existence / attribute / state / number /
    action / relation; official exact "Yes"/"No" reading), ``discriminative_normalized`` (the same
    under ``normalized_yes_no``) and ``generative`` (CHAIR, Cover, Hal, Cog). ``similarity``/``nouns``
    default to what ``info`` configures."""
    metas = [row_meta(r) for r in rows]
    metrics: dict[str, Any] = {}
    details = []
    disc = [(m["type"], m["truth"], r["answer"]) for r, m in zip(rows, metas) if m["type"] != "generative"]
    if disc:
        metrics["discriminative"] = score_discriminative(disc)
        metrics["answers_not_yes_no"] = sum(a not in ("Yes", "No") for _, _, a in disc)
        metrics["discriminative_normalized"] = score_discriminative((k, t, normalized_yes_no(a)) for k, t, a in disc)
    gen = [(r, m) for r, m in zip(rows, metas) if m["type"] == "generative"]
    if gen:
        label = "custom" if similarity else info.get("similarity", "none")
        if similarity is None or nouns is None:
            default_nouns, default_similarity = generative_tools(info.get("similarity", "none"),
                                                                 info.get("spacy_model", "en_core_web_lg"), info.get("wordnet"),
                                                                 info.get("nouns", "nltk"))
            similarity, nouns = similarity or default_similarity, nouns or default_nouns
        extract = nouns
        report = score_generative([(extract(r["answer"]), m["truth"], m["hallu"]) for r, m in gen],
                                  info["relation"], info.get("safe_words", []), similarity, info.get("threshold", 0.8))
        metrics["generative"] = report.printed()
        metrics["similarity"] = label  # "none": exact matches only, not comparable with published AMBER
        details += [{"id": r["id"], "nouns": item.nouns, "hallucinated": item.hallucinated}
                    for (r, _), item in zip(gen, report.items)]
    return metrics, details
