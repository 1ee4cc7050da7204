"""The judge proxy: an OpenAI-compatible ``/chat/completions`` in front of GPT-4 (or any upstream).

Every judged benchmark and the judge-ranked pair strategy talk to this instead of to OpenAI, so
that: the upstream key stays on the server (``judge.upstream_key_env``); clients use their own
revocable tokens (``judge.client_tokens_env``); deterministic requests are answered from a
persistent cache (identical concurrent ones share one upstream call); each client is rate
limited and all together are capped at ``max_concurrency`` upstream calls; 429/5xx are retried
with exponential backoff; and tokens and cost are accounted per client at ``GET /usage``.

The cache and the usage counts live in one sqlite file that every replica shares (``cache``,
``usage``). A hit costs a primary-key read and a ledger update in memory; the stored bytes go
back as they are. Every response says how long the app took (``Server-Timing``) and which
replica answered (``X-BPO-Replica``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from bpo_ray.config.serve import JudgeProxyConfig
from bpo_ray.serving.errors import APIError, install_error_handlers
from bpo_ray.serving.judge.auth import ClientAuth
from bpo_ray.serving.judge.cache import JudgeCache, cache_key, is_deterministic
from bpo_ray.serving.judge.limits import SlidingWindowLimiter
from bpo_ray.serving.judge.upstream import UpstreamClient, UpstreamResult
from bpo_ray.serving.judge.usage import Usage, UsageLedger, UsageStore
from bpo_ray.serving.timing import ServerTimingMiddleware

logger = logging.getLogger("bpo_ray.serving.judge")
USAGE_SETTLE_S = 0.05  # GET /usage with several replicas: how long the others get to write their counts


@dataclass
class _Answer:
    body: Optional[dict]          # a parsed answer (upstream, shared), or
    raw: Optional[bytes]          # a cached one, as stored (sent as-is: nothing parsed on a hit)
    source: str                   # "cache" | "upstream" | "shared"

    def response(self, replica: str) -> Response:
        headers = {"X-BPO-Cache": "miss" if self.source == "upstream" else "hit", "X-BPO-Replica": replica}
        if self.raw is not None:
            return Response(self.raw, media_type="application/json", headers=headers)
        return JSONResponse(self.body, headers=headers)


class JudgeProxy:
    """State and request handling of one proxy process (HTTP-free, so it is easy to reason about)."""

    def __init__(self, cfg: JudgeProxyConfig):
        self.cfg = cfg
        self.auth = ClientAuth.from_env(cfg.client_tokens_env)
        if not self.auth.configured:
            logger.warning("judge proxy: no client tokens in $%s; every request will be refused",
                           cfg.client_tokens_env)
        api_key = os.environ.get(cfg.upstream_key_env, "")
        if not api_key:
            logger.warning("judge proxy: $%s is empty; calling %s without a key", cfg.upstream_key_env,
                           cfg.upstream_base_url)
        self.upstream = UpstreamClient(cfg.upstream_base_url, api_key, cfg.timeout_s, cfg.max_retries,
                                       cfg.retry_backoff_s,
                                       redact_also=list(parse_tokens_for_redaction(cfg.client_tokens_env)))
        self.cache = JudgeCache(cfg.cache_path)
        self.limiter = SlidingWindowLimiter(cfg.rate_limit_per_minute)
        self.gate = asyncio.Semaphore(cfg.max_concurrency)
        self.usage_store = UsageStore(cfg.cache_path)  # shared by the replicas, like the cache
        self.ledger = UsageLedger(cfg.price_per_1k_prompt, cfg.price_per_1k_completion, self.usage_store)
        self.replica = replica_name()
        self._in_flight: dict[str, asyncio.Future] = {}
        self._flusher: Optional[asyncio.Task] = None

    def parse_body(self, raw: bytes) -> dict:
        if len(raw) > self.cfg.max_request_bytes:
            raise APIError(413, f"request body is over {self.cfg.max_request_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_request")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages: a non-empty list is required", code="invalid_request", param="messages")
        if body.get("stream"):
            raise APIError(400, "the judge proxy does not stream; send stream=false", code="stream_unsupported",
                           param="stream")
        model = self.cfg.upstream_model or body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model: required (the proxy has no judge.upstream_model)", code="invalid_request",
                           param="model")
        return {**body, "model": model}

    async def complete(self, client: str, body: dict) -> _Answer:
        key = cache_key(body, self.cfg.upstream_base_url) if is_deterministic(body) else None
        if key is not None:
            cached = self.cache.get_raw(key)  # a WAL read never waits for writers: no thread hop
            if cached is not None:
                return self._hit(client, cached.prompt_tokens, cached.completion_tokens,
                                 _Answer(None, cached.body, "cache"))
            shared = self._in_flight.get(key)
            if shared is not None:  # the same request is on its way upstream: wait for its answer
                body = await asyncio.shield(shared)
                p, c, _ = self.ledger.cost(body.get("usage"))
                return self._hit(client, p, c, _Answer(body, None, "shared"))
        retry_after = self.limiter.admit(client)
        if retry_after is not None:
            self._record(client, Usage(errors=1))
            raise APIError(429, f"rate limit of {self.cfg.rate_limit_per_minute} requests/minute reached",
                           code="rate_limit_exceeded", headers={"Retry-After": str(int(retry_after) + 1)})
        future: Optional[asyncio.Future] = None
        if key is not None:
            future = asyncio.get_running_loop().create_future()
            self._in_flight[key] = future
        try:
            async with self.gate:
                result = await self.upstream.complete(body)
            answer = self._settle(client, body, result)
            if key is not None:  # another replica may have stored this key first: its answer wins
                answer = await asyncio.to_thread(self.cache.put, key, answer)
            if future is not None:
                future.set_result(answer)
            return _Answer(answer, None, "upstream")
        except BaseException as exc:
            if future is not None and not future.done():
                future.set_exception(exc if isinstance(exc, APIError) else APIError(502, "upstream call failed"))
                future.exception()  # mark retrieved: waiters may not exist
            raise
        finally:
            if key is not None:
                self._in_flight.pop(key, None)

    def _hit(self, client: str, prompt_tokens: int, completion_tokens: int, answer: _Answer) -> _Answer:
        cost = self.ledger.price(prompt_tokens, completion_tokens)
        self._record(client, Usage(requests=1, cache_hits=1, saved_usd=cost))
        logger.info("judge: client=%s answered from %s", client, answer.source)
        return answer

    def _settle(self, client: str, body: dict, result: UpstreamResult) -> dict:
        usage = Usage(upstream_requests=1, upstream_attempts=result.attempts, retries=result.attempts - 1)
        logger.info("judge: client=%s model=%s upstream status=%s attempts=%d", client, body["model"],
                    result.status, result.attempts)
        if result.status == 200 and result.body is not None:
            usage.prompt_tokens, usage.completion_tokens, usage.cost_usd = self.ledger.cost(result.body.get("usage"))
            usage.requests = 1
            self._record(client, usage)
            return result.body
        usage.errors = 1
        self._record(client, usage)
        raise _client_error(result)

    def _record(self, client: str, delta: Usage) -> None:
        """Count ``delta`` now (memory) and have it written to the shared ledger soon, off the request path."""
        self.ledger.record(client, delta)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_pending())

    async def _flush_pending(self) -> None:
        while self.ledger.pending:  # what is recorded during a write goes in the next one
            batch = self.ledger.take_pending()
            try:
                await asyncio.to_thread(self.usage_store.add, batch)
            except Exception as exc:  # noqa: BLE001 - keep the counts; the next request retries
                self.ledger.restore(batch)
                logger.warning("judge: usage not written yet (%s); will retry", type(exc).__name__)
                return

    async def usage_report(self, client: str) -> dict:
        """``GET /usage``: every replica's counts for ``client`` and in total, from the shared ledger.
        Other replicas write theirs within milliseconds of answering; with several replicas the
        report waits ``USAGE_SETTLE_S`` so that what they answered before it was asked is in."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await self._flush_pending()
        if self.cfg.num_replicas > 1:
            await asyncio.sleep(USAGE_SETTLE_S)
        counts = await asyncio.to_thread(self.ledger.counts)
        report = self.ledger.report(client, counts)
        report["cache_entries"] = await asyncio.to_thread(len, self.cache)
        return report

    async def close(self) -> None:
        await self._flush_pending()
        await self.upstream.close()
        self.cache.close()
        self.usage_store.close()


def replica_name() -> str:
    """This Serve replica's id (``X-BPO-Replica``: which replica answered), or the process id outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not running in a Serve replica
        return f"pid-{os.getpid()}"


def parse_tokens_for_redaction(env_name: str) -> list[str]:
    from bpo_ray.serving.judge.auth import parse_client_tokens

    return list(parse_client_tokens(os.environ.get(env_name, "")))


def _client_error(result: UpstreamResult) -> APIError:
    """What the client sees when upstream failed (after retries)."""
    if result.status == 0:
        return APIError(502, f"{result.error} after {result.attempts} attempts", code="upstream_unreachable")
    if result.status in (401, 403):
        return APIError(502, "upstream refused the proxy's credentials (check the server's key)",
                        code="upstream_auth_failed")
    if result.status == 429:
        return APIError(503, f"upstream is rate limiting (gave up after {result.attempts} attempts)",
                        code="upstream_rate_limited", headers={"Retry-After": "30"})
    if 400 <= result.status < 500:
        return APIError(result.status, result.error, code="upstream_rejected_request")
    return APIError(502, f"{result.error} (after {result.attempts} attempts)", code="upstream_error")


def create_judge_app(cfg: JudgeProxyConfig, prefix: str = "") -> FastAPI:
    """FastAPI app serving ``{prefix}/chat/completions``, ``{prefix}/models`` and ``{prefix}/usage``."""
    proxy_holder: dict[str, JudgeProxy] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        proxy_holder["proxy"] = JudgeProxy(cfg)
        yield
        await proxy_holder.pop("proxy").close()

    app = FastAPI(title="bpo-ray judge proxy", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(ServerTimingMiddleware)

    def proxy() -> JudgeProxy:
        if "proxy" not in proxy_holder:  # apps mounted without lifespan (tests with httpx transports)
            proxy_holder["proxy"] = JudgeProxy(cfg)
        return proxy_holder["proxy"]

    @app.post(prefix + "/chat/completions")
    async def chat_completions(request: Request) -> Response:
        p = proxy()
        client = p.auth.authenticate(request.headers.get("authorization"))
        body = p.parse_body(await request.body())
        answer = await p.complete(client, body)
        return answer.response(p.replica)

    @app.get(prefix + "/usage")
    async def usage(request: Request) -> dict:
        p = proxy()
        return await p.usage_report(p.auth.authenticate(request.headers.get("authorization")))

    @app.get(prefix + "/models")
    async def models(request: Request) -> dict:
        p = proxy()
        p.auth.authenticate(request.headers.get("authorization"))
        names = [cfg.upstream_model] if cfg.upstream_model else []
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "upstream"} for n in names]}

    return app


@serve.deployment(name="JudgeProxy", num_replicas=1, max_ongoing_requests=1024)
@serve.ingress()
class JudgeProxyDeployment:
    """``judge.num_replicas`` replicas share the cache and the usage ledger (one sqlite file); rate
    limits, the concurrency cap and the merging of identical in-flight requests are per replica."""

    def __init__(self, judge_cfg: dict):
        self.cfg = JudgeProxyConfig.model_validate(judge_cfg)

    def __serve_build_asgi_app__(self):
        return create_judge_app(self.cfg)


def build_judge_application(cfg: JudgeProxyConfig, runtime_env: Optional[dict] = None):
    """The bound Serve application for ``cfg``."""
    actor: dict = {"num_cpus": cfg.num_cpus}
    if runtime_env:
        actor["runtime_env"] = runtime_env
    return JudgeProxyDeployment.options(num_replicas=cfg.num_replicas, ray_actor_options=actor).bind(
        cfg.model_dump(mode="json"))
