"""Config of the evaluate stage: which benchmarks, where their data is, how hard to hit the servers.

Every benchmark reads the bias world's test split by default (``source: world``) so the whole
stage runs offline; pointing ``source`` at the public format (COCO annotations, POPE json, MM-Vet
json, LLaVA-Bench jsonl, local paths or ``s3://`` URIs) evaluates on the real benchmark instead.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from bpo_ray.config.base import StrictModel

BENCHMARK_NAMES: tuple[str, ...] = ("chair", "pope", "mmvet", "llava_bench", "mmhal", "objhal", "amber")
JUDGE_ITEMS_HELP = "per-benchmark cap on items (overrides evaluate.max_items; judged benchmarks are costly)"


class BenchmarkSettings(StrictModel):
    """One benchmark's section: ``source`` is ``world`` or the benchmark's public format, which
    needs the files named in ``public_files`` (checked here, for every benchmark alike; the error
    names each missing one with its field's description)."""

    section: ClassVar[str]
    public_files: ClassVar[tuple[str, ...]]

    @model_validator(mode="after")
    def _public_source_needs_files(self) -> "BenchmarkSettings":
        missing = [name for name in self.public_files if not getattr(self, name)]
        if self.source != "world" and missing:
            wanted = [f"{self.section}.{name}" for name in self.public_files]
            listed = ", ".join(wanted[:-1]) + " and " + wanted[-1] if len(wanted) > 1 else wanted[0]
            fields = type(self).model_fields
            explained = [f"{name}: {fields[name].description}" if fields[name].description else name for name in missing]
            raise ValueError(f"{self.section}.source={self.source} needs {listed} (missing {'; '.join(explained)})")
        return self


class ChairSettings(BenchmarkSettings):
    """Object HalBench-style CHAIR on detailed descriptions (CHAIR_s = "Resp", CHAIR_i = "Obj")."""

    section: ClassVar[str] = "chair"
    public_files: ClassVar[tuple[str, ...]] = ("instances", "images")

    source: Literal["world", "coco"] = "world"
    extractor: Literal["rules", "judge"] = Field(
        "rules", description="find object mentions with the synonym table, or ask the judge to list them"
    )
    instances: Optional[str] = Field(None, description="COCO instances_*.json (ground-truth objects)")
    captions: Optional[str] = Field(None, description="COCO captions_*.json; objects they name join the truth, as in CHAIR")
    images: Optional[str] = Field(None, description="directory (local or s3://) holding the COCO images")
    synonyms: Optional[str] = Field(None, description="CHAIR synonyms.txt ('canonical, synonym, ...' per line)")
    matching: Literal["rohrbach", "corrected", "table"] = Field(
        "rohrbach",
        description="COCO object matching: 'rohrbach' = token for token as Rohrbach et al.'s utils/chair.py "
        "(comparable with published CHAIR, defects included), 'corrected' = the same rules with its defects "
        "fixed, 'table' = bpo-ray's synonym-table matcher (the one the bias world always uses)",
    )
    prompts: Optional[list[str]] = Field(
        None, description="description prompts, cycled over images (default: world records' own prompts / 8 built-in)"
    )
    max_tokens: Optional[int] = Field(None, ge=1, description="overrides evaluate.max_tokens")


class PopeSettings(BenchmarkSettings):
    """POPE yes/no object probes, split random / popular / adversarial."""

    section: ClassVar[str] = "pope"
    public_files: ClassVar[tuple[str, ...]] = ("files", "images")

    source: Literal["world", "pope"] = "world"
    files: dict[str, str] = Field(
        default_factory=dict, description="split -> official POPE json/jsonl file ({question_id,image,text,label})"
    )
    images: Optional[str] = Field(None, description="directory the POPE 'image' names are relative to")
    n_per_image: int = Field(3, ge=1, description="positives per image for world probes (as many negatives)")
    prompt_suffix: str = Field("", description="appended to each question, e.g. LLaVA-1.5's short-answer hint")
    max_tokens: int = Field(16, ge=1)


class MMVetSettings(BenchmarkSettings):
    """MM-Vet-style open answers graded 0-1 by the judge against the reference."""

    section: ClassVar[str] = "mmvet"
    public_files: ClassVar[tuple[str, ...]] = ("data", "images")

    source: Literal["world", "mmvet"] = "world"
    data: Optional[str] = Field(None, description="mm-vet.json ({id: {imagename, question, answer, capability}})")
    images: Optional[str] = Field(None, description="directory holding the MM-Vet images")
    judge_attempts: int = Field(5, ge=1, description="re-asks of an unparsable grade before it counts 0.0 (as MM-Vet)")
    grader_prompt_file: Optional[str] = Field(
        None, description="text file (local or s3://) with MM-Vet's official grader prompt, for comparable scores"
    )
    max_tokens: Optional[int] = Field(None, ge=1)
    max_items: Optional[int] = Field(None, ge=1, description=JUDGE_ITEMS_HELP)


class LlavaBenchSettings(BenchmarkSettings):
    """LLaVA-Bench-style: the judge rates reference and candidate 1-10; relative score per category."""

    section: ClassVar[str] = "llava_bench"
    public_files: ClassVar[tuple[str, ...]] = ("questions", "answers", "context", "images")

    source: Literal["world", "llava_bench"] = "world"
    questions: Optional[str] = Field(None, description="questions.jsonl ({question_id, image, text, category})")
    answers: Optional[str] = Field(None, description="reference answers jsonl ({question_id, text})")
    context: Optional[str] = Field(None, description="context.jsonl ({image, caption})")
    images: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    rule_prompt_file: Optional[str] = Field(
        None, description="text file (local or s3://) with LLaVA's own review rule, for comparable scores"
    )
    max_items: Optional[int] = Field(None, ge=1, description=JUDGE_ITEMS_HELP)


class MMHalSettings(BenchmarkSettings):
    """MMHal-Bench: the judge rates each answer 0-6 against image contents and a reference answer."""

    section: ClassVar[str] = "mmhal"
    public_files: ClassVar[tuple[str, ...]] = ("data",)

    source: Literal["world", "mmhal"] = "world"
    data: Optional[str] = Field(None, description="response_template.json (a list of MMHal-Bench records)")
    images: Optional[str] = Field(None, description="directory holding the images (by the file name of image_src)")
    judge_prompt_file: Optional[str] = Field(
        None, description="text file (local or s3://) with the official judge template (four '{}'), for comparable scores"
    )
    max_tokens: Optional[int] = Field(None, ge=1)
    max_items: Optional[int] = Field(None, ge=1, description=JUDGE_ITEMS_HELP)


class ObjHalSettings(BenchmarkSettings):
    """Object HalBench as RLHF-V / RLAIF-V score it (``bpo_ray.metrics.objhal``)."""

    section: ClassVar[str] = "objhal"
    public_files: ClassVar[tuple[str, ...]] = ("questions", "instances", "synonyms")

    source: Literal["world", "objhal"] = Field(
        "world", description="'world' = the bias world's test split written in Object HalBench's file formats "
        "(bpo_ray.world.public_files); 'objhal' = the files below")
    questions: Optional[str] = Field(None, description="obj_halbench_300_with_image.jsonl ({image_id, question, image (base64) | image_path})")
    instances: Optional[str] = Field(None, description="COCO instances_val2014.json")
    captions: Optional[str] = Field(None, description="COCO captions_val2014.json")
    synonyms: Optional[str] = Field(None, description="RLAIF-V eval/data/synonyms_refine.txt")
    wordnet: Optional[str] = Field(None, description="WordNet 3.0 dict dir (index.noun, noun.exc); default: /usr/share/wordnet or nltk_data")
    images: Optional[str] = Field(None, description="directory image_path / COCO_val2014_<id>.jpg names are relative to")
    image_cache: str = Field("~/.cache/bpo-ray/objhal", description="where base64 images of the question file are written")
    extractor: Literal["rules", "judge"] = Field(
        "rules", description="find object mentions with the reference's rule path, or ask the judge to list the "
        "objects (the reference's --use_gpt path), each listed name then read by the same rules")
    max_tokens: Optional[int] = Field(1024, ge=1, description="RLAIF-V's muffin_vqa.py generates up to 1024 new tokens")
    max_items: Optional[int] = Field(None, ge=1, description="overrides evaluate.max_items (first N questions)")


class AmberSettings(BenchmarkSettings):
    """AMBER (``bpo_ray.metrics.amber``): discriminative yes/no and generative descriptions."""

    section: ClassVar[str] = "amber"
    public_files: ClassVar[tuple[str, ...]] = ("annotations", "queries", "images")

    source: Literal["world", "amber"] = Field(
        "world", description="'world' = the bias world's test split written in AMBER's file formats "
        "(bpo_ray.world.public_files); 'amber' = the files below")
    annotations: Optional[str] = Field(None, description="AMBER data/annotations.json")
    queries: Optional[str] = Field(None, description="a data/query/query_*.json file ({id, image, query})")
    relation: Optional[str] = Field(None, description="AMBER data/relation.json (generative)")
    safe_words: Optional[str] = Field(None, description="AMBER data/safe_words.txt (generative)")
    images: Optional[str] = Field(None, description="directory holding AMBER_<n>.jpg")
    similarity: Literal["none", "spacy"] = Field(
        "none", description="word similarity of the generative scorer: 'spacy' = spaCy model `spacy_model` "
        "(the official en_core_web_lg, installed by the user), 'none' = exact matches only (not comparable)")
    spacy_model: str = "en_core_web_lg"
    similarity_threshold: float = Field(0.8, ge=0, le=1)
    wordnet: Optional[str] = Field(None, description="WordNet 3.0 dict dir for the noun lemmas")
    nouns: Literal["nltk", "every_token"] = Field(
        "nltk", description="generative noun finder: 'nltk' = NLTK's pos_tag as the reference (needs nltk and its "
        "averaged_perceptron_tagger data); 'every_token' = every token is a candidate (only relation.json words are "
        "scored, so it differs only where such a word is not used as a noun)")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_items: Optional[int] = Field(None, ge=1, description="overrides evaluate.max_items (first N queries)")


class EvaluateConfig(StrictModel):
    benchmarks: list[Literal["chair", "pope", "mmvet", "llava_bench", "mmhal", "objhal", "amber"]] = Field(
        default_factory=lambda: ["chair", "pope"]
    )
    world: Optional[str] = Field(None, description="bias-world directory for source=world (default: world.out)")
    max_items: Optional[int] = Field(None, ge=1, description="per benchmark (POPE: per split), first N in a fixed order")
    concurrency: int = Field(4, ge=1, description="model requests in flight, over all actors")
    judge_concurrency: int = Field(4, ge=1, description="judge requests in flight, over all actors (<= concurrency)")
    actors: int = Field(1, ge=1, description="Ray Data actors (max pool size); each runs concurrency/actors threads")
    actor_num_cpus: float = Field(0.25, ge=0, description="HTTP callers are I/O bound: a fraction of a CPU")
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    request_timeout_s: float = Field(120, gt=0)
    max_retries: int = Field(2, ge=0, description="openai client retries on connection errors, 429 and 5xx")
    judge_model: str = "gpt-4"
    chair: ChairSettings = ChairSettings()
    pope: PopeSettings = PopeSettings()
    mmvet: MMVetSettings = MMVetSettings()
    llava_bench: LlavaBenchSettings = LlavaBenchSettings()
    mmhal: MMHalSettings = MMHalSettings()
    objhal: ObjHalSettings = ObjHalSettings()
    amber: AmberSettings = AmberSettings()
