"""Scale benchmark of generate ingestion: synthetic LLaVA sources of 100k and 1M records.

Each size runs in a fresh driver process (so its peak RSS is its own) through the real generate
path with a model-free negative:

    scan_source (Ray Data: read chunks, validate, count, duplicate ids)      "read + validate"
      -> SourceIndex.dataset (Ray Data: explode turns, order, shards, groups)
      -> load_images (tasks: read + decode + hash each item's image)
      -> rule_negatives (tasks: "No, " + the ground truth, labelled error_injection / generator
         bench:rule; the one stand-in for a model)
      -> build_outcomes (tasks: filters, pair rows) -> _consume + ShardStore (driver: shard commits)

and prints the driver's peak RSS, records/s of read + validate and of the whole path, and the
ratios 1M / 100k. A third run reads the 100k source with the old driver-side reader
(``sources.read_source``) as the baseline the streaming reader replaces; a fourth times each step's
CPU cost per item in one process (``time.process_time``: load on a shared box does not change it),
which is what the cost model in docs/scale.md scales up.

    .venv/bin/python bench/scale.py [--sizes 100000,1000000] [--work /tmp/bpo-scale] [--pipeline-max 1000000]

Sizes above ``--pipeline-max`` run read + validate + shard (scan and emit, no images or pairs).
The sources (about 330 bytes a record; 1 in 1000 a duplicate id, 1 in 997 a broken line, 1 in 10
with two turns) are written once under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

N_IMAGES = 16
GROUP = 256
SHARD = 4096


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    return _status()["VmRSS"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status() -> dict[str, float]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}


class RssSampler(threading.Thread):
    """Peak of each RSS part, sampled every ``every_s``: ``RssAnon`` is the driver's own memory;
    ``RssShmem`` counts pages of Ray's shared-memory object store the driver has read blocks from
    (shared with the store, not held by the driver), which ``VmHWM``/``ru_maxrss`` also include."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.every_s, self.peak, self._stop_flag = every_s, {}, threading.Event()

    def run(self) -> None:
        while not self._stop_flag.is_set():
            for k, v in _status().items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)
            self._stop_flag.wait(self.every_s)

    def stop(self) -> dict[str, float]:
        self._stop_flag.set()
        self.join()
        for k, v in _status().items():
            self.peak[k] = max(self.peak.get(k, 0.0), v)
        return {f"peak_{k}_mb": v for k, v in self.peak.items()}


def write_source(folder: Path, n: int) -> dict:
    """``n`` LLaVA-format records as JSONL over ``N_IMAGES`` small identical-size images."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    (folder / "images").mkdir(exist_ok=True)
    for i in range(N_IMAGES):
        Image.new("RGB", (32, 32), (i * 15, 80, 200 - i * 10)).save(folder / "images" / f"{i}.png")
    expected_items = 0
    tmp = folder / "train.jsonl.tmp"
    with open(tmp, "w") as f:
        for r in range(n):
            if r % 997 == 996:
                f.write('{"id": "broken-%d", "image": "images/1.png", "conversa\n' % r)
                expected_items += 1
                continue
            rid = f"rec-{r - 1:07d}" if r % 1000 == 999 else f"rec-{r:07d}"  # 1 in 1000 repeats an id
            conv = [{"from": "human", "value": f"<image>\nWhat is in picture {r}? Describe the objects and colours."},
                    {"from": "gpt", "value": f"Picture {r} shows a blue cup on a wooden table next to a red book."}]
            if r % 10 == 0:
                conv += [{"from": "human", "value": "What colour is the cup?"},
                         {"from": "gpt", "value": "The cup is blue."}]
            f.write(json.dumps({"id": rid, "image": f"images/{r % N_IMAGES}.png", "conversations": conv}) + "\n")
            expected_items += 1 if r % 1000 == 999 else len(conv) // 2
    tmp.rename(folder / "train.jsonl")
    meta = {"records": n, "items": expected_items, "bytes": (folder / "train.jsonl").stat().st_size}
    meta_path.write_text(json.dumps(meta))
    return meta


def rule_negatives(batch: dict, seed: int) -> dict:
    """A model-free negative per ok item: "No, " + the ground truth (adds a negation: a content change)."""
    from bpo_ray.generate.rows import with_column
    from bpo_ray.generate.seeds import sampling_seed

    negs = []
    for status, item_id, answer in zip(batch["status"], batch["item_id"], batch["answer"]):
        if status != "ok":
            negs.append([])
            continue
        negs.append([{"text": f"No, {answer}", "generator": "bench:rule", "sampling": {"backend": "rule"},
                      "seed": sampling_seed(seed, "error_injection", str(item_id))}])
    return with_column(batch, "neg_error_injection", negs)


def cpu_costs(source: str, out: str, n_records: int = 20000) -> dict:
    """CPU seconds per record of each step, in one process without Ray (``time.process_time``,
    so a loaded machine slows the wall clock but not these numbers): what a cluster pays per item."""
    import numpy as np
    import pyarrow as pa

    from bpo_ray.config.generate import FilterConfig
    from bpo_ray.generate.image_loader import load_images
    from bpo_ray.generate.ingest import IdRegistry, chunk_records, plan_chunks, read_chunk
    from bpo_ray.generate.pairs import build_outcomes
    from bpo_ray.generate.shards import ShardStore
    from bpo_ray.generate.sources import count_items, explode_record, screen_record

    chunk = plan_chunks([source], None, 1 << 40)[0]
    data = read_chunk(chunk)
    data = b"\n".join(data.splitlines()[:n_records]) + b"\n"
    cost: dict[str, float] = {}
    t = time.process_time()
    reg, entries = IdRegistry(), []
    for rec, (locator, record, error) in enumerate(chunk_records(chunk, data)):
        _, rid, bad = screen_record(chunk.stem, locator, record, error)
        if bad is None:
            entries.append((rid, rec, count_items(record)))
    reg.register(entries)
    reg.resolve()
    cost["scan (parse, validate, count, register id)"] = time.process_time() - t
    t = time.process_time()
    items = []
    for rec, (locator, record, error) in enumerate(chunk_records(chunk, data)):
        src, rid, bad = screen_record(chunk.stem, locator, record, error)
        items += [bad] if bad is not None else explode_record(record, src, chunk.root, 20000, rid)
    for order, item in enumerate(items):
        item.update(order=order, shard=order // SHARD, group=order // GROUP)
    table = pa.Table.from_pylist(items)
    cost["emit (parse again, explode turns, item rows)"] = time.process_time() - t
    batches = [{k: np.array(v, dtype=object) for k, v in table.slice(i, GROUP).to_pydict().items()}
               for i in range(0, table.num_rows, GROUP)]
    steps = [("load_images (read, decode, hash)", lambda b: load_images(b, max_bytes=1 << 20, keep_bytes=False)),
             ("rule negative (stand-in for a model)", lambda b: rule_negatives(b, seed=0)),
             ("build_outcomes (filters, pair rows)", lambda b: build_outcomes(
                 b, strategies=["error_injection"], filters=FilterConfig().model_dump()))]
    for name, fn in steps:
        t = time.process_time()
        batches = [fn(b) for b in batches]
        cost[name] = time.process_time() - t
    t = time.process_time()
    store = ShardStore(out)
    store.clear()
    shard_results: dict[int, list] = {}
    for b in batches:  # as pipeline._consume: count the pairs, buffer the JSON, parse again at commit
        for order, shard, outcome, result in zip(b["order"], b["shard"], b["outcome"], b["result"]):
            _ = 0 if outcome == "quarantined" else len(json.loads(result)["pairs"])
            shard_results.setdefault(int(shard), []).append((int(order), result))
    for shard, results in shard_results.items():
        store.commit(shard, [dict(json.loads(r), order=o) for o, r in results])
    cost["driver: decode results, commit shards"] = time.process_time() - t
    n = len(items)
    return {"records": n_records, "items": n, "us_per_item": {k: 1e6 * v / n for k, v in cost.items()}}


def child(args) -> None:
    """One measured driver: scan (+ emit, + the pair path if ``--pipeline``) of one source."""
    import ray
    from ray.data import DataContext

    from bpo_ray.config.generate import FilterConfig
    from bpo_ray.generate.image_loader import load_images
    from bpo_ray.generate.ingest import scan_source
    from bpo_ray.generate.pairs import build_outcomes
    from bpo_ray.generate.pipeline import _consume
    from bpo_ray.generate.shards import ShardStore, total_counts

    meta = json.loads((Path(args.source).parent / "meta.json").read_text())
    res: dict = {"records": meta["records"], "expected_items": meta["items"], "mode": args.mode}
    sampler = RssSampler()
    sampler.start()
    if args.mode == "cpu_costs":
        res.update(cpu_costs(args.source, args.out))
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.mode == "driver_reader":
        from bpo_ray.generate.sources import read_source

        res["rss_start_mb"] = rss_mb()[0]
        t0 = time.perf_counter()
        read = read_source(args.source)
        res["scan_s"] = time.perf_counter() - t0
        res["items"] = len(read.items)
        res["rss_peak_mb"] = rss_mb()[1]
        res.update(sampler.stop())
        print("RESULT " + json.dumps(res), flush=True)
        return
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    res["rss_start_mb"] = rss_mb()[0]
    t0 = time.perf_counter()
    index = scan_source(args.source, num_cpus=0.5)
    res["scan_s"] = time.perf_counter() - t0
    res["chunks"] = len(index.chunks)
    res["items"] = index.n_items
    res["rss_after_scan_mb"] = rss_mb()[0]
    try:
        ds = index.dataset(SHARD, GROUP, num_cpus=0.5)
        t1 = time.perf_counter()
        if args.mode == "scan_emit":
            n = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                n += batch.num_rows
            res["emitted"] = n
        else:
            ds = ds.map_batches(load_images, fn_kwargs=dict(max_bytes=1 << 20, keep_bytes=False),
                                batch_size=GROUP, num_cpus=0.5)
            ds = ds.map_batches(rule_negatives, fn_kwargs=dict(seed=0), batch_size=GROUP, num_cpus=0.5)
            ds = ds.map_batches(build_outcomes, fn_kwargs=dict(strategies=["error_injection"],
                                                               filters=FilterConfig().model_dump()),
                                batch_size=GROUP, num_cpus=0.5)
            store = ShardStore(args.out)
            store.clear()
            _consume(ds, store, index.shard_sizes(SHARD), progress=False)
            counts = total_counts(store.iter_markers(), expected_items=index.n_items)
            res.update(paired=counts.paired, filtered=counts.filtered, quarantined=counts.quarantined,
                       pairs_written=counts.pairs_written, by_reason=counts.by_reason)
        res["rest_s"] = time.perf_counter() - t1
    finally:
        index.close()
    res["total_s"] = time.perf_counter() - t0
    res["rss_peak_mb"] = rss_mb()[1]
    res.update(sampler.stop())
    print("RESULT " + json.dumps(res), flush=True)
    ray.shutdown()


def run_child(source: Path, out: Path, mode: str, ray_cpus: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--source", str(source), "--out", str(out), "--mode", mode,
           "--ray-cpus", str(ray_cpus)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode} run on {source} failed (rc {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--work", default="/tmp/bpo-scale")
    ap.add_argument("--pipeline-max", type=int, default=1_000_000,
                    help="sizes above this run read + validate + shard only (no images, pairs, commits)")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="pipeline", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"scale bench: sizes {sizes}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for n in sizes:
        folder = work / f"source-{n}"
        t0 = time.perf_counter()
        meta = write_source(folder, n)
        print(f"source {n}: {meta['bytes'] / 2**20:.0f} MiB, {meta['items']} items "
              f"(written or reused in {time.perf_counter() - t0:.0f}s)", flush=True)
        mode = "pipeline" if n <= args.pipeline_max else "scan_emit"
        res = run_child(folder / "train.jsonl", work / f"out-{n}", mode, args.ray_cpus)
        results.append(res)
        print(f"  {mode}: {json.dumps(res)}", flush=True)
    base_n = sizes[0]
    base = run_child(work / f"source-{base_n}" / "train.jsonl", work / "unused", "driver_reader", args.ray_cpus)
    print(f"  driver_reader (old read_source, {base_n}): {json.dumps(base)}", flush=True)
    costs = run_child(work / f"source-{base_n}" / "train.jsonl", work / "out-cpu", "cpu_costs", args.ray_cpus)

    print(f"\n{'run':34s} {'records':>9s} {'items':>9s} {'read+validate s':>16s} {'rec/s':>8s} "
          f"{'whole path s':>13s} {'rec/s':>8s} {'peak RSS MiB':>13s} {'peak anon MiB':>14s}")
    for r in results + [base]:
        whole = r.get("total_s")
        label = {"pipeline": "streaming: read->validate->shard->pair", "scan_emit": "streaming: read->validate->shard",
                 "driver_reader": "old driver reader (read_source)"}[r["mode"]]
        whole_s = f"{whole:13.1f}" if whole else f"{'-':>13s}"
        whole_rate = f"{r['records'] / whole:8.0f}" if whole else f"{'-':>8s}"
        print(f"{label:34s} {r['records']:9d} {r['items']:9d} {r['scan_s']:16.1f} {r['records'] / r['scan_s']:8.0f} "
              f"{whole_s} {whole_rate} {r['rss_peak_mb']:13.0f} {r['peak_RssAnon_mb']:14.0f}")
    for r in results:
        if r["mode"] == "pipeline":
            ok = r["paired"] + r["filtered"] + r["quarantined"] == r["items"] == r["expected_items"]
            print(f"accounting {r['records']}: items {r['items']} = paired {r['paired']} + filtered {r['filtered']} "
                  f"+ quarantined {r['quarantined']} ({'exact' if ok else 'MISMATCH'}); pairs {r['pairs_written']}")
        elif r.get("emitted") is not None:
            print(f"accounting {r['records']}: emitted {r['emitted']} of {r['items']} items "
                  f"(expected {r['expected_items']})")
    print("\nratios:")
    first, last = results[0], results[-1]
    ratios = {
        f"driver peak RSS {last['records']} / {first['records']}": last["rss_peak_mb"] / first["rss_peak_mb"],
        f"driver peak anon RSS {last['records']} / {first['records']}":
            last["peak_RssAnon_mb"] / first["peak_RssAnon_mb"],
        f"read+validate rec/s {last['records']} / {first['records']}":
            (last["records"] / last["scan_s"]) / (first["records"] / first["scan_s"]),
        f"driver peak anon RSS streaming / old reader ({base_n})": first["peak_RssAnon_mb"] / base["peak_RssAnon_mb"],
        f"read+validate rec/s streaming / old reader ({base_n})":
            (first["records"] / first["scan_s"]) / (base["records"] / base["scan_s"]),
    }
    for k, v in ratios.items():
        print(f"  {k:56s} {v:6.2f}x")
    per = costs["us_per_item"]
    print(f"\nCPU time per item, one process ({costs['items']} items; process_time, load-independent):")
    for k, v in per.items():
        print(f"  {k:48s} {v:8.1f} us")
    workers = sum(v for k, v in per.items() if not k.startswith("driver"))
    print(f"  {'all worker-side steps':48s} {workers:8.1f} us  -> {1e6 / workers:8.0f} items/s per core")
    driver = per["driver: decode results, commit shards"]
    print(f"  {'driver-side step':48s} {driver:8.1f} us  -> {1e6 / driver:8.0f} items/s ceiling of one driver")
    (work / "bench_scale.json").write_text(json.dumps({"results": results, "driver_reader": base, "ratios": ratios,
                                                       "cpu_costs": costs}, indent=2))
    print(f"\nresults: {work / 'bench_scale.json'}")


if __name__ == "__main__":
    main()
