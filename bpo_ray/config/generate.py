"""Config of the generate stage (paper section 3.1)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from bpo_ray.config.base import StrictModel


class PoolConfig(StrictModel):
    """An autoscaling Ray Data actor pool; fractional CPUs/GPUs are allowed.

    ``max_restarts`` / ``max_task_retries`` (-1 = unlimited) let a killed actor be replaced and
    its in-flight batches retried, so the job still completes.
    """

    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    max_restarts: int = Field(-1, ge=-1)
    max_task_retries: int = Field(-1, ge=-1)

    @model_validator(mode="after")
    def _min_le_max(self) -> "PoolConfig":
        if self.min_size > self.max_size:
            raise ValueError(f"pool min_size {self.min_size} > max_size {self.max_size}")
        return self


class NoiseConfig(StrictModel):
    """DDPM forward-noise schedule on image embeddings (VCD's schedule, DESIGN.md)."""

    num_steps: int = Field(1000, ge=1, description="T")
    steps: list[int] = Field(default_factory=lambda: [500], description="t values to sample at")

    @field_validator("steps")
    @classmethod
    def _steps_in_range(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v):
            raise ValueError("need at least one non-negative noise step")
        if len(set(v)) != len(v):
            raise ValueError(f"noise steps must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _steps_below_t(self) -> "NoiseConfig":
        bad = [s for s in self.steps if s >= self.num_steps]
        if bad:
            raise ValueError(f"noise steps {bad} must be < num_steps {self.num_steps}")
        return self


class SamplingConfig(StrictModel):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class InjectionSamplingConfig(SamplingConfig):
    """Error-injection sampling; the reference code samples at temperature 0.8, top_p 0.95.

    (A subclass, not ``SamplingConfig(temperature=0.8)``: an override of one key such as
    ``generate.injector.sampling.max_new_tokens=32`` must keep these defaults.)
    """

    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)


class JudgeSamplingConfig(SamplingConfig):
    """Judge-ranked sampling: Li et al. 2024 samples its N completions at temperature 0.7."""

    temperature: float = Field(0.7, ge=0)


class SamplerConfig(StrictModel):
    """The image-weakened sampler (and the MLLM that judge-ranked sampling uses)."""

    backend: Literal["transformers", "vllm"] = "transformers"
    noise: NoiseConfig = NoiseConfig()
    sampling: SamplingConfig = SamplingConfig()
    pool: PoolConfig = PoolConfig()
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vllm.LLM arguments (e.g. gpu_memory_utilization)")


class InjectorConfig(StrictModel):
    backend: Literal["transformers", "vllm"] = "transformers"
    sampling: InjectionSamplingConfig = InjectionSamplingConfig()
    pool: PoolConfig = PoolConfig()
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vLLM engine arguments for ray.data.llm")


class JudgeRankedConfig(StrictModel):
    """Li et al. 2024's judge-ranked pairs: N samples, judge scores, best vs a clearly worse one."""

    judge_url: Optional[str] = Field(None, description="base URL of any OpenAI-compatible API")
    judge_model: str = "gpt-4"
    judge_token_env: str = Field("BPO_JUDGE_TOKEN", description="env var holding this client's judge-proxy token "
                                 "(never the upstream key, which stays with the proxy)")
    num_samples: int = Field(4, ge=2)
    min_score_gap: float = Field(2.0, ge=0)
    sampling: JudgeSamplingConfig = JudgeSamplingConfig()
    send_image: bool = Field(True, description="attach the image as a data URL (vision judges)")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, description="transport retries (connection errors, 429, 5xx) by the openai client")
    parse_retries: int = Field(1, ge=0, description="ask again when a reply has no usable ratings")
    draw: Literal["among_worse", "any_other"] = Field(
        "among_worse", description="rejected answer: random among those >= min_score_gap below the best, or "
        "random among all others and kept only with the gap (Li et al. 2024 section 3.2 read literally)")
    pool: PoolConfig = PoolConfig()


class OnPolicySamplingConfig(SamplingConfig):
    """On-policy sampling on the clean image; RLAIF-V samples its candidates at temperature 0.7."""

    temperature: float = Field(0.7, ge=0)


class DetectorConfig(StrictModel):
    """An open-vocabulary detector (OWLv2 / Grounding DINO through transformers) used as verifier.

    ``kind: scene_truth`` answers from the item's object annotations through the detector
    interface (CPU tests and the bias world); ``owlv2`` loads ``model_id`` with
    ``transformers.Owlv2ForObjectDetection`` on ``device`` (GPU clusters).
    """

    kind: Literal["scene_truth", "owlv2"] = "scene_truth"
    model_id: str = "google/owlv2-base-patch16-ensemble"
    threshold: float = Field(0.3, gt=0, le=1)
    device: str = "auto"


class VerifierConfig(StrictModel):
    """Who decides whether a mentioned object is in the image (``bpo_ray.generate.verifiers``)."""

    kind: Literal["annotations", "judge", "detector"] = "annotations"
    synonyms: Optional[str] = Field(
        None, description="object vocabulary: a bias-world world.json (its `synonyms`) or CHAIR's synonyms.txt; "
        "default: world.json beside the source file")
    annotations: Optional[str] = Field(
        None, description="COCO instances JSON or Visual Genome objects JSON (image file name / id -> objects); "
        "default: the records' own `objects` field")
    annotations_format: Literal["coco", "visual_genome"] = "coco"
    judge_url: Optional[str] = Field(None, description="OpenAI-compatible base URL (e.g. the judge proxy)")
    judge_model: str = "gpt-4"
    judge_token_env: str = Field("BPO_JUDGE_TOKEN", description="env var holding this client's judge-proxy token "
                                 "(never the upstream key, which stays with the proxy)")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, description="retries of an unusable reply or outage before quarantine")
    detector: DetectorConfig = DetectorConfig()


class OnPolicyConfig(StrictModel):
    """On-policy, verifier-labelled pairs (RLAIF-V; SENTINEL, ICCV 2025): the policy's own answers,
    a verifier's verdict per object mention, sentence-level (default) or response-level pairs."""

    adapter: Optional[str] = Field(None, description="a trained LoRA adapter dir: sample from the tuned policy")
    num_samples: int = Field(4, ge=1, description="K answers per item")
    num_continuations: int = Field(4, ge=1, description="grounded continuations sampled from the shared prefix")
    pair_level: Literal["sentence", "response"] = "sentence"
    span: Literal["sentence", "to_end"] = Field(
        "to_end", description="sentence pairs: compare only the next sentence, or the rest of the answer")
    min_gap: int = Field(1, ge=1, description="response pairs: hallucinated mentions rejected - chosen")
    item_sources: Optional[list[str]] = Field(
        None, description="only items whose `source` is listed (e.g. [caption]: descriptions); the others are "
        "filtered as source_not_selected without sampling (null: all)")
    sampling: OnPolicySamplingConfig = OnPolicySamplingConfig()
    verifier: VerifierConfig = VerifierConfig()
    pool: PoolConfig = PoolConfig()


class FilterConfig(StrictModel):
    """Drop degenerate negatives; each drop is counted by reason in the manifest."""

    min_chars: int = Field(1, ge=0)
    max_length_ratio: float = Field(4.0, gt=1)
    length_floor_words: int = Field(4, ge=1, description="word counts below this count as this")
    require_content_change: bool = True


class IngestConfig(StrictModel):
    """Streaming source ingestion (``bpo_ray/generate/ingest.py``); runtime-only, not in the plan,
    except that the chunking is fingerprinted there (a different ``chunk_mb`` cannot resume)."""

    chunk_mb: float = Field(8.0, gt=0, description="JSON Lines files are scanned in byte ranges of this size")
    id_partitions: int = Field(2, ge=1, description="IdRegistry actors holding the record ids (~190 B each)")
    emit_tasks: int = Field(2, ge=1, description="emit tasks at once (each releases a chunk's items; the driver "
                            "buffers incomplete shards)")
    object_store_mb: Optional[float] = Field(
        128.0, gt=0, description="Ray Data's object-store budget for the generate dataset (blocks in flight "
        "between emit and the driver; Ray's default is half the object store, which a fast emit fills with a "
        "backlog that the driver's RSS follows, docs/scale.md). Raise it when blocks carry images for GPU pools "
        "(at least a few blocks per actor); null: Ray's default")


class GenerateConfig(StrictModel):
    strategies: list[Literal["image_weakened", "error_injection", "judge_ranked", "on_policy"]] = Field(
        default_factory=lambda: ["image_weakened", "error_injection"]
    )
    seed: int = 0
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_text_chars: int = Field(20000, ge=1, description="longer questions/answers are quarantined")
    shard_size: int = Field(64, ge=1, description="items per resumable output shard")
    max_items: Optional[int] = Field(None, ge=1, description="only the first N items (smoke runs)")
    sample_items: Optional[int] = Field(
        None, ge=1, description="a uniform sample of N items from the whole source, seeded by `seed` and kept in "
        "source order: a small run that still spreads over every image (unlike max_items' first N)")
    io_num_cpus: float = Field(0.25, ge=0, description="CPUs per image-loading / pair-building task")
    outcome_tasks: int = Field(
        1, ge=1, description="pair-building (build_outcomes) tasks at once. One task builds and filters a shard's "
        "pairs in a few ms (~4,000 rows/s); each further task in flight makes Ray start a worker process (~1 "
        "CPU-s) while the model stages need the CPUs (docs/generate.md, session 22). Raise it only where pairs "
        "arrive faster than one task keeps up with")
    progress: bool = True
    sampler: SamplerConfig = SamplerConfig()
    injector: InjectorConfig = InjectorConfig()
    judge_ranked: JudgeRankedConfig = JudgeRankedConfig()
    on_policy: OnPolicyConfig = OnPolicyConfig()
    filters: FilterConfig = FilterConfig()
    ingest: IngestConfig = IngestConfig()

    @field_validator("strategies")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("need at least one strategy")
        if len(set(v)) != len(v):
            raise ValueError(f"strategies must be distinct, got {v}")
        return v
