"""Config of the serve stage (model app + judge proxy)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from bpo_ray.config.base import StrictModel


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)


class ModelAppConfig(StrictModel):
    backend: Literal["transformers", "vllm"] = "transformers"
    route_prefix: str = "/v1"
    served_name: str = "base"
    adapters: dict[str, str] = Field(default_factory=dict, description="model name -> adapter dir/URI")
    max_image_bytes: int = Field(5 * 1024 * 1024, ge=1)
    max_tokens: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    allow_remote_images: bool = False
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    autoscaling: AutoscalingConfig = AutoscalingConfig()


class JudgeProxyConfig(StrictModel):
    route_prefix: str = "/judge/v1"
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_model: Optional[str] = None
    upstream_key_env: str = "OPENAI_API_KEY"
    client_tokens_env: str = "BPO_JUDGE_TOKENS"
    cache_path: str = "runs/tiny/judge_cache.sqlite"
    rate_limit_per_minute: int = Field(600, ge=1)
    max_concurrency: int = Field(16, ge=1)
    max_retries: int = Field(4, ge=0)
    timeout_s: float = Field(60, gt=0)
    price_per_1k_prompt: float = Field(0.03, ge=0)
    price_per_1k_completion: float = Field(0.06, ge=0)


class ServeConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: ModelAppConfig = ModelAppConfig()
    judge: JudgeProxyConfig = JudgeProxyConfig()
