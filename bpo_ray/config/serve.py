"""Config of the serve stage (model app + judge proxy)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from bpo_ray.config.base import StrictModel

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class AutoscalingConfig(StrictModel):
    """Ray Serve's ``autoscaling_config`` for the model deployment (the fields passed through as is).

    Serve adds a replica when the ongoing requests per replica, averaged over
    ``look_back_period_s``, stay above ``target_ongoing_requests`` for ``upscale_delay_s``, and
    removes one after ``downscale_delay_s`` below it. The delays default to Ray's own.
    """

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0, description="load above target this long adds replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below target this long removes replicas")
    look_back_period_s: float = Field(30.0, gt=0, description="window the ongoing-request count is averaged over")

    @model_validator(mode="after")
    def _min_le_max(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ModelAppConfig(StrictModel):
    backend: Literal["transformers", "vllm"] = "transformers"
    route_prefix: str = "/v1"
    served_name: str = Field("base", description="model name of the base model (no adapter)")
    adapters: dict[str, str] = Field(default_factory=dict, description="model name -> adapter dir/URI")
    max_image_bytes: int = Field(5 * 1024 * 1024, ge=1)
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(2048, ge=1, description="image tokens included")
    allow_remote_images: bool = Field(False, description="also fetch http(s):// and s3:// image URLs")
    remote_image_timeout_s: float = Field(10, gt=0)
    num_cpus: float = Field(1.0, ge=0, description="per model replica")
    num_gpus: float = Field(0.0, ge=0, description="per model replica")
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    max_ongoing_requests: int = Field(32, ge=1, description="per model replica, queued beyond that")
    max_batch_size: int = Field(8, ge=1, description="transformers backend: requests batched per generate")
    batch_wait_timeout_s: float = Field(0.01, ge=0)

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r} must match {ADAPTER_NAME.pattern}")
        return value

    @model_validator(mode="after")
    def _names_distinct(self) -> "ModelAppConfig":
        if self.served_name in self.adapters:
            raise ValueError(f"adapter name {self.served_name!r} is the base model's served_name")
        return self


class JudgeProxyConfig(StrictModel):
    route_prefix: str = "/judge/v1"
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_model: Optional[str] = Field(None, description="force this upstream model; None: the client's")
    upstream_key_env: str = "OPENAI_API_KEY"
    client_tokens_env: str = Field("BPO_JUDGE_TOKENS", description="env var: 'name:token,...' or 'token,...'")
    cache_path: str = Field("runs/tiny/judge_cache.sqlite",
                            description="sqlite file (answers and usage), shared by the replicas on one host")
    num_replicas: int = Field(1, ge=1, description="proxy replicas; they share cache_path, so keep them on "
                                                   "one node (rate limits and max_concurrency are per replica)")
    rate_limit_per_minute: int = Field(600, ge=1, description="per client, requests that reach upstream")
    max_concurrency: int = Field(16, ge=1, description="upstream requests in flight, all clients")
    max_retries: int = Field(4, ge=0, description="on upstream 429/5xx and connection errors")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    timeout_s: float = Field(60, gt=0)
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1)
    price_per_1k_prompt: float = Field(0.03, ge=0)
    price_per_1k_completion: float = Field(0.06, ge=0)
    num_cpus: float = Field(0.0, ge=0, description="judge proxy replica (I/O only)")


class ServeConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="who takes HTTP on port: Serve's HTTP proxy, or HAProxy straight to the replicas "
                             "(bpo_ray/serving/ingress.py; a cluster-wide switch, set when Ray starts)")
    model: ModelAppConfig = ModelAppConfig()
    judge: JudgeProxyConfig = JudgeProxyConfig()
