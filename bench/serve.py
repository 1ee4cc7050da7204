"""Serving benchmark: the model app on Ray Serve vs a single-process FastAPI/uvicorn server doing
the same transformers ``generate``, measured in the same run; plus the judge proxy's cache-hit
speedup.

    .venv/bin/python bench/serve.py                      # tiny random LLaVA, CPU
    .venv/bin/python bench/serve.py --replicas 2 --requests-per-client 6 --out runs/bench/serve.json

For each concurrency (1, 4, 16 clients, each sending requests back to back) it reports
requests/s and p50/p99 latency of both servers and the Serve/baseline throughput ratio. The
judge part sends K distinct deterministic requests through the proxy (cache misses: the proxy
calls the model app upstream) and then the same K again, several rounds (cache hits), and prints
the hit p50 as the client sees it and as the proxy app spends it (``Server-Timing``), and the
miss/hit ratio.

``--ingress haproxy`` (default) runs Serve with its HAProxy ingress (``bpo_ray/serving/ingress.py``);
Serve's own HTTP proxy then runs as the fallback on another port, and the judge hit rounds
alternate between the two, so the ingress speedup is measured in the same run on the same replica.
``--only judge`` skips the model-app comparison (the model app still runs: it is the upstream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bpo_ray.serving.timing import server_ms  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCH_TOKEN = "bench-" + secrets.token_hex(12)
os.environ["BPO_BENCH_JUDGE_TOKENS"] = f"bench:{BENCH_TOKEN}"  # inherited by the Serve replicas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(i: int, max_tokens: int) -> dict:
    import numpy as np
    from PIL import Image

    from bpo_ray.images import to_data_url

    img = Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8"))
    return {"model": "base", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."},
                                                      {"type": "image_url", "image_url": {"url": to_data_url(img)}}]}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def samples(url: str, bodies: list[dict], clients: int, per_client: int,
                  headers: dict | None = None) -> dict:
    """``clients`` concurrent clients, each sending ``per_client`` requests back to back: latencies
    (ms, client-observed), the app's own time where it says (``Server-Timing``, ms), wall seconds."""
    latencies: list[float] = []
    server: list[float] = []
    limits = httpx.Limits(max_connections=clients + 4)

    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers or {}) as http:
        async def client(c: int) -> None:
            for k in range(per_client):
                t0 = time.perf_counter()
                resp = await http.post(url, json=bodies[(c * per_client + k) % len(bodies)])
                resp.raise_for_status()
                latencies.append(1000 * (time.perf_counter() - t0))
                app_ms = server_ms(resp.headers.get("server-timing"))
                if app_ms is not None:
                    server.append(app_ms)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "server": server, "wall": wall, "clients": clients}


def summary(runs: list[dict]) -> dict:
    """requests/s, p50/p99 latency (client) and the app's p50 over one or more ``samples`` runs."""
    latencies = [x for r in runs for x in r["latencies"]]
    server = [x for r in runs for x in r["server"]]
    out = {"clients": runs[0]["clients"], "requests": len(latencies),
           "rps": len(latencies) / sum(r["wall"] for r in runs),
           "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99)}
    if server:
        out["server_p50_ms"] = percentile(server, 0.5)
    return out


async def load(url: str, bodies: list[dict], clients: int, per_client: int, headers: dict | None = None) -> dict:
    return summary([await samples(url, bodies, clients, per_client, headers)])


def wait_http(url: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def model_bench(targets: dict[str, str], bodies: list[dict], args) -> list[dict]:
    """The model app on Serve vs the one-process baseline at each concurrency level."""
    for url in targets.values():  # warm up both (first-request costs)
        asyncio.run(load(url, bodies, 2, 2))
    print(f"\nmodel app: {len(bodies)} distinct image requests, max_tokens={args.max_tokens}, "
          f"{args.replicas} Serve replicas x 1 CPU (batch<= {args.max_batch_size}) vs 1 uvicorn process")
    print(f"{'clients':>7} | {'serve req/s':>11} {'p50 ms':>8} {'p99 ms':>8} | "
          f"{'base req/s':>10} {'p50 ms':>8} {'p99 ms':>8} | {'rps ratio':>9}")
    levels = []
    for c in args.concurrency:
        per_client = max(args.requests_per_client, -(-args.min_requests // c))
        row = {name: asyncio.run(load(url, bodies, c, per_client)) for name, url in targets.items()}
        row["rps_ratio"] = row["serve"]["rps"] / row["baseline"]["rps"]
        levels.append(row)
        s, b = row["serve"], row["baseline"]
        print(f"{c:>7} | {s['rps']:>11.2f} {s['p50_ms']:>8.0f} {s['p99_ms']:>8.0f} | "
              f"{b['rps']:>10.2f} {b['p50_ms']:>8.0f} {b['p99_ms']:>8.0f} | {row['rps_ratio']:>8.2f}x")
    return levels


def sequential(http: httpx.Client, url: str, bodies: list[dict]) -> dict:
    """``bodies`` one after another on one keep-alive connection (what a judge client does)."""
    latencies: list[float] = []
    server: list[float] = []
    t_start = time.perf_counter()
    for body in bodies:
        t0 = time.perf_counter()
        resp = http.post(url, json=body)
        resp.raise_for_status()
        latencies.append(1000 * (time.perf_counter() - t0))
        app_ms = server_ms(resp.headers.get("server-timing"))
        if app_ms is not None:
            server.append(app_ms)
    return {"latencies": latencies, "server": server, "wall": time.perf_counter() - t_start, "clients": 1}


def judge_bench(judge: str, args, serve_proxy_judge: str | None = None) -> dict:
    """Cache misses (the model app answers upstream), then the same requests again, ``--judge-hit-rounds``
    times (cache hits), from one client on a keep-alive connection: client-observed latency and the
    proxy app's own time (``Server-Timing``). With ``serve_proxy_judge`` (the same app behind Serve's
    own HTTP proxy, the fallback proxy of the HAProxy ingress) the hit rounds alternate between the
    two ingresses: same replica, same cache, same client."""
    bodies = [{**request_body(10_000 + i, args.max_tokens), "seed": 0} for i in range(args.judge_requests)]
    targets = {"ingress": judge, "serve_proxy": serve_proxy_judge} if serve_proxy_judge else {"ingress": judge}
    clients = {name: httpx.Client(timeout=300, headers={"Authorization": f"Bearer {BENCH_TOKEN}"})
               for name in targets}
    try:
        miss = summary([sequential(clients["ingress"], judge + "/chat/completions", bodies)])
        hits: dict[str, list[dict]] = {name: [] for name in targets}
        for name, base in targets.items():  # first hits on each connection: set-up, code paths warmed
            sequential(clients[name], base + "/chat/completions", bodies)
        for _ in range(args.judge_hit_rounds):
            for name, base in targets.items():
                hits[name].append(sequential(clients[name], base + "/chat/completions", bodies))
        usage = clients["ingress"].get(judge + "/usage").json()["usage"]
    finally:
        for http in clients.values():
            http.close()
    hit = summary(hits["ingress"])
    out = {"ingress": args.ingress, "miss": miss, "hit": hit, "speedup_p50": miss["p50_ms"] / hit["p50_ms"],
           "upstream_requests": usage["upstream_requests"], "cache_hits": usage["cache_hits"]}
    print(f"\njudge proxy ({len(bodies)} deterministic requests, upstream = the model app; "
          f"ingress {args.ingress}; {hit['requests']} timed hits, 1 client, keep-alive):")
    print(f"  cache hit  p50 {hit['p50_ms']:.2f} ms client-observed (p99 {hit['p99_ms']:.2f}), "
          f"{hit.get('server_p50_ms', float('nan')):.3f} ms in the proxy app (Server-Timing)")
    if serve_proxy_judge:
        old = summary(hits["serve_proxy"])
        out["hit_serve_proxy"] = old
        out["ingress_speedup_p50"] = old["p50_ms"] / hit["p50_ms"]
        print(f"  same hits through Serve's HTTP proxy (Ray's default ingress), alternating rounds: "
              f"p50 {old['p50_ms']:.2f} ms client-observed (p99 {old['p99_ms']:.2f}), "
              f"{old.get('server_p50_ms', float('nan')):.3f} ms in the app -> {args.ingress} "
              f"{out['ingress_speedup_p50']:.1f}x faster")
    print(f"  cache miss p50 {miss['p50_ms']:.1f} ms -> hits {out['speedup_p50']:.1f}x faster; "
          f"upstream calls {usage['upstream_requests']}, cache hits {usage['cache_hits']}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mllm", help="LLaVA checkpoint dir (default: build the tiny random one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16, help="per level, at least this many in total")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2, help="Serve model replicas (1 CPU each)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--judge-requests", type=int, default=8)
    parser.add_argument("--judge-hit-rounds", type=int, default=8, help="hits: the judge requests, this many times")
    parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                        help="serve.ingress: HAProxy straight to the replicas (then the judge hits are also "
                             "timed through Serve's own proxy, the fallback), or Serve's HTTP proxy only")
    parser.add_argument("--only", choices=("model", "judge"),
                        help="run one part (judge: the model app still runs, as the proxy's upstream)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from bpo_ray.config import load_config
    from bpo_ray.serving.apps import with_adapters
    from bpo_ray.serving.deploy import base_url, start_serving
    from bpo_ray.serving.ingress import export_ingress_env

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    mllm = args.mllm
    if not mllm:
        from bpo_ray.models.tiny import build_tiny_models

        mllm = build_tiny_models(tmp / "models", seed=0)["mllm"]

    port = free_port()
    cfg = with_adapters(load_config("tiny", [
        f"models.mllm={mllm}", f"serve.port={port}", f"serve.ingress={args.ingress}", "serve.model.num_cpus=1",
        f"serve.model.autoscaling.min_replicas={args.replicas}", f"serve.model.autoscaling.max_replicas={args.replicas}",
        f"serve.model.max_batch_size={args.max_batch_size}",
        f"serve.judge.upstream_base_url=http://127.0.0.1:{port}/v1", "serve.judge.upstream_model=base",
        "serve.judge.client_tokens_env=BPO_BENCH_JUDGE_TOKENS", f"serve.judge.cache_path={tmp / 'judge.sqlite'}",
        "serve.judge.rate_limit_per_minute=100000", "serve.judge.upstream_key_env=BPO_BENCH_NO_KEY",
    ]), {})
    n_bodies = max(max(args.concurrency) * args.requests_per_client, args.min_requests)
    bodies = [request_body(i, args.max_tokens) for i in range(n_bodies)]

    baseline = None
    if args.only != "judge":
        baseline_port = free_port()
        baseline = subprocess.Popen([sys.executable, "-m", "bpo_ray.serving.standalone", "--port",
                                     str(baseline_port), "--set", f"models.mllm={mllm}"],
                                    cwd=Path(__file__).resolve().parents[1])
    results: dict = {"config": {**vars(args), "mllm": mllm, "cpus": os.cpu_count()}, "levels": []}
    fallback_port = free_port() if args.ingress == "haproxy" else None
    export_ingress_env(args.ingress, drain_s=1, fallback_port=fallback_port)  # before Ray starts
    try:
        ray.init(num_cpus=args.replicas + 1, include_dashboard=False, namespace="bench-serve",
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
        t0 = time.perf_counter()
        urls = start_serving(cfg)
        results["serve_start_s"] = time.perf_counter() - t0
        if baseline is not None:
            wait_http(f"http://127.0.0.1:{baseline_port}/v1/models")
            targets = {"serve": urls.model + "/chat/completions",
                       "baseline": f"http://127.0.0.1:{baseline_port}/v1/chat/completions"}
            results["levels"] = model_bench(targets, bodies, args)
        if args.only != "model":
            results["judge"] = judge_bench(urls.judge, args, fallback_port and base_url(
                "127.0.0.1", fallback_port, cfg.serve.judge.route_prefix))
    finally:
        if baseline is not None:
            baseline.terminate()
            baseline.wait(timeout=30)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
