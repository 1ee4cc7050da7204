"""``evaluate(cfg, model_url, model_name, judge_url, out)``: every configured benchmark against one
served model, scored, written, and returned as a dict of metrics (what ``bpo-ray demo`` calls)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence

from bpo_ray import storage
from bpo_ray.config import BPOConfig, config_differences
from bpo_ray.config.evaluate import EvaluateConfig
from bpo_ray.evaluate.benchmarks import amber, chair, llava_bench, mmhal, mmvet, objhal, pope
from bpo_ray.evaluate.items import LoadedBenchmark
from bpo_ray.evaluate.judge import MODEL_TOKEN_ENV, JudgeProtocol, Secret, error_reason, model_client, secret_from_env
from bpo_ray.evaluate.runner import EndpointSpec, run_rows
from bpo_ray.progress import progress as report_progress

METRICS_FILE = "metrics.json"
ITEMS_FILE = "items.jsonl"
SKIPPED_FILE = "skipped.jsonl"


class EvaluateError(RuntimeError):
    """The evaluation cannot start (bad endpoint, missing judge, no data); nothing was scored."""


def safe_name(model_name: str) -> str:
    """A directory name for a model name ("org/model:lora" -> "org_model_lora")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"


def world_dir(cfg: BPOConfig) -> str:
    return cfg.evaluate.world or cfg.world.out


#: Per benchmark: its module (``load_world`` reads the bias world) and its public-format loader.
_MODULES = {"chair": chair, "pope": pope, "mmvet": mmvet, "llava_bench": llava_bench, "mmhal": mmhal,
            "objhal": objhal, "amber": amber}
_PUBLIC_LOADERS: dict[str, Callable[..., LoadedBenchmark]] = {
    "chair": chair.load_coco, "pope": pope.load_official, "mmvet": mmvet.load_official,
    "llava_bench": llava_bench.load_official, "mmhal": mmhal.load_official, "objhal": objhal.load, "amber": amber.load}
_SEEDED_WORLD_LOADERS = ("pope", "mmhal")  # their world items are drawn with the world's seed


def load_benchmark(name: str, cfg: BPOConfig) -> LoadedBenchmark:
    """Items of one benchmark from its configured source; a benchmark's own ``max_items`` (where it
    has one) overrides ``evaluate.max_items``."""
    if name not in _MODULES:
        raise EvaluateError(f"unknown benchmark {name!r}")
    settings = getattr(cfg.evaluate, name)
    limit = getattr(settings, "max_items", None) or cfg.evaluate.max_items
    if settings.source != "world":
        return _PUBLIC_LOADERS[name](settings, limit)
    seeded = {"seed": cfg.world.seed} if name in _SEEDED_WORLD_LOADERS else {}
    return _MODULES[name].load_world(world_dir(cfg), settings, limit, **seeded)


def _prompt_file(uri: Optional[str]) -> Optional[str]:
    """A judge prompt supplied by the user (e.g. a benchmark's official text), or ``None``."""
    return storage.read_text(uri) if uri else None


def judge_protocols(cfg: BPOConfig) -> dict[str, JudgeProtocol]:
    """The benchmarks of this config that need the judge, with their protocols."""
    ecfg = cfg.evaluate
    protocols: dict[str, JudgeProtocol] = {}
    if "chair" in ecfg.benchmarks and ecfg.chair.extractor == "judge":
        protocols["chair"] = chair.OBJECT_LIST_JUDGE
    if "objhal" in ecfg.benchmarks and ecfg.objhal.extractor == "judge":
        protocols["objhal"] = chair.OBJECT_LIST_JUDGE
    if "mmvet" in ecfg.benchmarks:
        protocols["mmvet"] = mmvet.grader_protocol(ecfg.mmvet.judge_attempts, _prompt_file(ecfg.mmvet.grader_prompt_file))
    if "llava_bench" in ecfg.benchmarks:
        protocols["llava_bench"] = llava_bench.reviewer(_prompt_file(ecfg.llava_bench.rule_prompt_file))
    if "mmhal" in ecfg.benchmarks:
        protocols["mmhal"] = mmhal.judge_protocol(_prompt_file(ecfg.mmhal.judge_prompt_file))
    return protocols


def judge_token() -> Secret:
    """The judge proxy token from the environment (``BPO_JUDGE_TOKEN``; on one machine the first of
    the proxy's own ``BPO_JUDGE_TOKENS``), or a clear ``EvaluateError``."""
    from bpo_ray.serving.judge.client import client_token

    try:
        return Secret(client_token())
    except RuntimeError as exc:
        raise EvaluateError(str(exc)) from None


def proxy_usage(judge_url: str, token: Secret, timeout_s: float = 10.0) -> Optional[dict[str, Any]]:
    """The judge proxy's ``GET /usage`` for this client (``None`` when the judge is not our proxy or
    does not answer: usage is a report, never a reason to fail the evaluation)."""
    import httpx

    try:
        resp = httpx.get(judge_url.rstrip("/") + "/usage", timeout=timeout_s,
                         headers={"Authorization": f"Bearer {token.get()}"})
        body = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("usage"), dict) else None


def usage_delta(before: Optional[dict[str, Any]], after: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """What this run cost at the judge proxy: the client's counters after minus before, plus the
    proxy's totals (all clients) and cache size after the run."""
    if after is None:
        return None
    was = (before or {}).get("usage", {})
    run = {k: round(v - was.get(k, 0), 6) if isinstance(v, float) else v - was.get(k, 0)
           for k, v in after["usage"].items() if isinstance(v, (int, float))}
    return {"run": run, "proxy_total": after.get("total", {}), "cache_entries": after.get("cache_entries"),
            "prices_per_1k": after.get("prices_per_1k", {})}


def max_tokens_for(name: str, cfg: BPOConfig) -> int:
    ecfg = cfg.evaluate
    override = {"chair": ecfg.chair.max_tokens, "pope": ecfg.pope.max_tokens, "mmvet": ecfg.mmvet.max_tokens,
                "llava_bench": ecfg.llava_bench.max_tokens, "mmhal": ecfg.mmhal.max_tokens,
                "objhal": ecfg.objhal.max_tokens, "amber": ecfg.amber.max_tokens}.get(name)
    return override or ecfg.max_tokens


def check_model_served(model_url: str, model_name: str, timeout_s: float = 30.0) -> list[str]:
    """Names the endpoint serves; raises ``EvaluateError`` when it is unreachable or lacks the model."""
    client = model_client(model_url, secret_from_env(MODEL_TOKEN_ENV), timeout_s, max_retries=2)
    try:
        served = [m.id for m in client.models.list()]
    except Exception as exc:
        raise EvaluateError(f"model endpoint {model_url} did not answer /models ({error_reason(exc)})") from None
    if model_name not in served:
        raise EvaluateError(f"model {model_name!r} is not served at {model_url} (served: {', '.join(served) or 'none'})")
    return served


def score_benchmark(name: str, rows: list[dict[str, Any]], loaded: LoadedBenchmark, cfg: BPOConfig) -> tuple[dict, list]:
    if name == "chair":
        return chair.score(rows, loaded.info, cfg.evaluate.chair.extractor)
    if name == "pope":
        return pope.score(rows)
    if name == "mmvet":
        return mmvet.score(rows)
    if name == "objhal":
        return objhal.score(rows, loaded.info, cfg.evaluate.objhal.extractor)
    if name == "amber":
        return amber.score(rows, loaded.info)
    if name == "mmhal":
        return mmhal.score(rows)
    return llava_bench.score(rows)


def drop_duplicate_ids(bench: LoadedBenchmark) -> LoadedBenchmark:
    """Keep the first item of each id (answers are matched back by id); later ones are skipped."""
    seen: set[str] = set()
    kept = []
    for item in bench.items:
        if item.id in seen:
            bench.skip("duplicate_id", {"id": item.id, "image": item.image, "question": item.question})
        else:
            seen.add(item.id)
            kept.append(item)
    bench.items = kept
    return bench


def _usable(row: dict[str, Any]) -> bool:
    """A row the scorer can use: answered, and judged when it needed the judge."""
    if row.get("error"):
        return False
    return not row.get("needs_judge") or bool(row.get("judge_value"))


#: Evaluate settings every benchmark's numbers depend on, besides its own section.
SHARED_SETTINGS: tuple[str, ...] = ("world", "max_items", "max_tokens", "temperature")


def stale_benchmarks(earlier: Optional[Mapping[str, Any]], ecfg: EvaluateConfig) -> list[str]:
    """Benchmarks of ``ecfg`` that an earlier ``metrics.json`` lacks or scored under other settings
    (its own ``evaluate.<name>`` section, the shared settings, the judge model of a judged one)."""
    if not earlier:
        return list(ecfg.benchmarks)
    done = earlier.get("benchmarks") or {}
    judged = set(earlier.get("judged") or ())

    def same(name: str) -> bool:
        keys = [name, *SHARED_SETTINGS, *(["judge_model"] if name in judged else [])]
        return name in done and not changed_settings(earlier, ecfg, keys)

    return [name for name in ecfg.benchmarks if not same(name)]


def changed_settings(earlier: Mapping[str, Any], ecfg: EvaluateConfig, keys: Sequence[str]) -> list[str]:
    """Of ``keys`` (``evaluate`` settings), those an earlier ``metrics.json`` recorded otherwise."""
    before, now = earlier.get("config") or {}, ecfg.model_dump(mode="json")
    return [k for k in keys if config_differences(before.get(k), now.get(k))]


def read_metrics(out: str, model_name: str) -> Optional[dict[str, Any]]:
    """``<out>/<model>/metrics.json`` written by an earlier ``evaluate``, or ``None``."""
    uri = storage.join(out, safe_name(model_name), METRICS_FILE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def evaluate(
    cfg: BPOConfig,
    model_url: str,
    model_name: str,
    judge_url: Optional[str] = None,
    out: Optional[str] = None,
    progress: bool = True,
    add: bool = False,
) -> dict[str, Any]:
    """Run ``cfg.evaluate.benchmarks`` against ``model_name`` served at ``model_url``.

    Writes ``<out>/<model>/items.jsonl`` (every item: question, answer, judge reply, errors,
    per-item score details) and ``<out>/<model>/metrics.json`` (what this returns) when ``out`` is
    given. Returns ``{"model", "benchmarks": {name: metrics}, "counts", "failures", "timings", ...}``.

    ``add``: keep the other benchmarks of an earlier run into ``out`` (their items, numbers and
    settings) and replace only the ones evaluated now, so a benchmark can be added to a finished
    evaluation; refused when the shared settings (``SHARED_SETTINGS``) differ from that run's.
    """
    from bpo_ray.raycluster import init_ray, worker_runtime_env
    from bpo_ray.schemas import library_versions

    ecfg = cfg.evaluate
    started = time.perf_counter()
    earlier = read_metrics(out, model_name) if add and out else None
    differ = changed_settings(earlier, ecfg, SHARED_SETTINGS) if earlier else []
    if differ:
        raise EvaluateError(f"--add: the earlier results of {model_name} in {out} were made with other evaluate "
                            f"settings ({', '.join(differ)}); evaluate every benchmark again instead")
    protocols = judge_protocols(cfg)
    if protocols and not judge_url:
        raise EvaluateError(f"benchmarks {sorted(protocols)} need a judge: pass --judge-url (the judge proxy's /judge/v1)")
    token = judge_token() if protocols else None
    check_model_served(model_url, model_name)

    loaded = {name: drop_duplicate_ids(load_benchmark(name, cfg)) for name in ecfg.benchmarks}
    rows = [item.to_row(max_tokens_for(name, cfg), name in protocols)
            for name, bench in loaded.items() for item in bench.items]
    if not rows:
        raise EvaluateError("no benchmark items to evaluate (check the data paths and max_items)")
    load_s = time.perf_counter() - started

    init_ray(cfg.ray)
    model_spec = EndpointSpec(model_url, model_name, secret_from_env(MODEL_TOKEN_ENV), ecfg.concurrency, ecfg.actors,
                              ecfg.actor_num_cpus, ecfg.request_timeout_s, ecfg.max_retries, ecfg.temperature)
    judge_spec = None
    if protocols:
        judge_spec = EndpointSpec(judge_url, ecfg.judge_model, token, ecfg.judge_concurrency,
                                  ecfg.actors, ecfg.actor_num_cpus, ecfg.request_timeout_s, ecfg.max_retries)
    usage_before = proxy_usage(judge_url, token) if judge_spec else None
    run_started = time.perf_counter()
    answered: dict[str, dict[str, Any]] = {}
    with _quiet_ray_data_progress():
        stream = run_rows(rows, model_spec, judge_spec, protocols, runtime_env=worker_runtime_env(cfg.numerics))
        for row in report_progress(stream, total=len(rows), desc=f"evaluate {model_name}", disable=not progress, unit="item"):
            answered[row["id"]] = row
    run_s = time.perf_counter() - run_started
    judge_usage = usage_delta(usage_before, proxy_usage(judge_url, token)) if judge_spec else None

    results: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    failures: dict[str, dict[str, int]] = {}
    all_details: dict[str, dict[str, Any]] = {}
    for name, bench in loaded.items():
        bench_rows = [answered[item.id] for item in bench.items if item.id in answered]
        usable = [r for r in bench_rows if _usable(r)]
        reasons = Counter(r["error"] or f"judge_{r['judge_error']}" for r in bench_rows if not _usable(r))
        reasons.update({f"load_{k}": v for k, v in bench.skipped.items()})
        reasons.update({"lost_in_job": len(bench.items) - len(bench_rows)} if len(bench_rows) < len(bench.items) else {})
        metrics, details = score_benchmark(name, usable, bench, cfg) if usable else ({}, [])
        results[name] = metrics
        counts[name] = {"items": len(bench.items), "scored": len(usable), "failed": len(bench.items) - len(usable),
                        "skipped_at_load": sum(bench.skipped.values())}
        failures[name] = dict(sorted(reasons.items()))
        all_details.update({d["id"]: d for d in details})

    metrics = {
        "model": model_name,
        "model_url": model_url,
        "judge_url": judge_url,
        "judge_model": ecfg.judge_model if protocols else None,
        "judge_usage": judge_usage,
        "benchmarks": results,
        "counts": counts,
        "failures": failures,
        "sources": {name: bench.info.get("source") for name, bench in loaded.items()},
        "latency_s": _latency_summary([r["latency_s"] for r in answered.values() if not r.get("error")]),
        "timings": {"load_s": load_s, "run_s": run_s, "total_s": time.perf_counter() - started},
        "config": ecfg.model_dump(mode="json"),
        "versions": library_versions(),
    }
    metrics["judged"] = sorted(protocols)
    if out:
        skipped = [record for bench in loaded.values() for record in bench.skipped_records]
        kept: tuple[list[str], list[str]] = ([], [])
        if earlier:
            metrics, kept = _merge_with_earlier(out, model_name, earlier, metrics)
        write_model_outputs(out, model_name, metrics, rows, answered, all_details, skipped, kept)
    return metrics


def _merge_with_earlier(out: str, model_name: str, earlier: dict[str, Any],
                        metrics: dict[str, Any]) -> tuple[dict[str, Any], tuple[list[str], list[str]]]:
    """``metrics`` with the earlier run's other benchmarks added back; the item and skipped lines
    of those benchmarks to keep."""
    before, now = earlier.get("config") or {}, metrics["config"]
    new = set(metrics["benchmarks"])
    merged = dict(metrics)
    for key in ("benchmarks", "counts", "failures", "sources"):
        merged[key] = {**{k: v for k, v in (earlier.get(key) or {}).items() if k not in new}, **metrics[key]}
    old_names = [k for k in earlier.get("benchmarks", {}) if k not in new]
    merged["config"] = {**now, **{k: before[k] for k in old_names if k in before},
                        "benchmarks": [*old_names, *metrics["config"]["benchmarks"]]}
    merged["judged"] = sorted({*(j for j in earlier.get("judged") or () if j not in new), *metrics["judged"]})
    model_dir = storage.join(out, safe_name(model_name))

    def kept_lines(name: str) -> list[str]:
        uri = storage.join(model_dir, name)
        lines = storage.read_text(uri).splitlines() if storage.exists(uri) else []
        return [line for line in lines if line.strip() and json.loads(line).get("benchmark") not in new]

    return merged, (kept_lines(ITEMS_FILE), kept_lines(SKIPPED_FILE))


def write_model_outputs(out: str, model_name: str, metrics: dict[str, Any], rows: list[dict[str, Any]],
                        answered: dict[str, dict[str, Any]], details: dict[str, dict[str, Any]],
                        skipped: Sequence[dict[str, Any]] = (),
                        kept: tuple[list[str], list[str]] = ([], [])) -> str:
    """``<out>/<model>/items.jsonl`` in input order, ``skipped.jsonl`` (input records no item
    could be made from, with reasons) and ``metrics.json``; returns the model dir. ``kept``: lines
    of earlier benchmarks (items, skipped) written first, as they were."""
    model_dir = storage.join(out, safe_name(model_name))
    lines = list(kept[0])
    for row in rows:
        done = answered.get(row["id"], {**row, "error": "lost_in_job"})
        record = {k: v for k, v in done.items() if k != "meta"}
        record["meta"] = json.loads(row["meta"])
        record["score"] = details.get(row["id"])
        lines.append(json.dumps(record, sort_keys=True, default=_json_default))
    storage.write_text(storage.join(model_dir, ITEMS_FILE), "\n".join(lines) + "\n")
    storage.write_text(storage.join(model_dir, SKIPPED_FILE),
                       "".join(line + "\n" for line in kept[1]) + "".join(json.dumps(r) + "\n" for r in skipped))
    storage.write_text(storage.join(model_dir, METRICS_FILE), json.dumps(metrics, indent=2, default=_json_default) + "\n")
    return model_dir


def collect_results(out: str) -> dict[str, dict[str, Any]]:
    """Every ``<out>/*/metrics.json`` written by ``evaluate``, keyed by model name."""
    results: dict[str, dict[str, Any]] = {}
    for uri in storage.list_files(out, suffix="/" + METRICS_FILE):
        metrics = json.loads(storage.read_text(uri))
        if isinstance(metrics, dict) and "benchmarks" in metrics:
            results[metrics.get("model", uri)] = metrics
    return results


def _latency_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick: Callable[[float], float] = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"mean": sum(ordered) / len(ordered), "p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars from pandas batches
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class _quiet_ray_data_progress:
    """Our tqdm bar replaces Ray Data's per-operator bars for the duration of one run."""

    def __enter__(self):
        from ray.data import DataContext

        self.ctx = DataContext.get_current()
        self.saved = self.ctx.enable_progress_bars
        self.ctx.enable_progress_bars = False
        return self

    def __exit__(self, *exc):
        self.ctx.enable_progress_bars = self.saved
        return False
