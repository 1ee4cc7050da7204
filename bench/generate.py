"""Generate-stage benchmark, all numbers from one run on the same tiny LLaVA and the same items:

1. pairs/s of the Ray Data pipeline (image-weakened negatives, transformers backend) against a
   plain sequential loop in one process (per item: read image, encode, noise, generate, filter,
   build the pair) with the same model, sampling and filters;
2. the pipeline with the vLLM backend (``enable_mm_embeds``) against the transformers backend;
3. the cost of noisy against clean sampling: the same batches generated from noised and from
   clean features, in process, on both backends;
4. the pipeline's floor at this item count: the same transformers pipeline with 1-token answers
   (everything but decoding: Ray Data, the scan, actor start and model load, image loading,
   encoding, prefill, pair building, commits). No pipeline that decodes can beat it, so
   ``loop s / floor s`` is the most the pipeline/loop ratio can reach at this size however fast
   decoding gets (docs/generate.md, "Session 23"). Skipped with ``--no-loop``.

    .venv/bin/python bench/generate.py [--size tiny|larger] [--items 768] [--tokens 32] [--rounds 1] [--no-loop]
                                       [--out runs/bench/generate]

``--size`` picks the LM: ``tiny`` (the tiny config's 2 layers, 128 hidden) or ``larger`` (4 layers,
512 hidden, 8 heads, 1408 intermediate: about 20x the LM FLOPs per token, where the model, not
per-step overheads, starts to dominate and continuous batching matters); the vision tower is
the same small CLIP in both.

The pipeline's fixed start (scan, Ray Data plan, actor start and model load: about 8.6 s at 768
items on 2 cores) decides the pipeline-vs-loop ratio of short runs: 0.53x at 96 items, 2.11-2.13x
at 768 (the floor: at most 2.46x) and 3.92x at 3072 (2 cores, 2 sampler actors against one
process; docs/generate.md).

Pipeline times are end to end (``run_generate``: source read, actor start and model load,
generation, shard commits), and so is the loop's (model load included). The tiny models are
random-init: the answers are gibberish of the configured length, which is what the timing needs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


# LM sizes of ``--size`` (``bpo_ray.models.tiny.TinySpec`` fields; the vision tower stays tiny).
SIZES = {
    "tiny": {},
    "larger": {"lm_hidden": 512, "lm_layers": 4, "lm_heads": 8, "lm_intermediate": 1408},
}


def sequential_loop(cfg, source: str, n_items: int) -> dict:
    """The baseline: one process, one item at a time, same model/sampling/noise/filters."""
    from bpo_ray.generate.backends import MLLMRunner
    from bpo_ray.generate.image_loader import read_image
    from bpo_ray.generate.image_weakened import STRATEGY, weaken
    from bpo_ray.generate.pairs import filter_reason
    from bpo_ray.generate.seeds import sampling_seed
    from bpo_ray.generate.sources import read_source
    from bpo_ray.images import decode_image

    gen = cfg.generate
    t0 = time.perf_counter()
    runner = MLLMRunner(cfg.models.mllm, backend="transformers", device="cpu")
    pairs = 0
    for item in read_source(source, max_items=n_items).items:
        data, _ = read_image(item["image_uri"], gen.max_image_bytes)
        enc = runner.encode([decode_image(data)], [item["llava_prompt"]])
        clean = runner.features(enc["pixel_values"])
        for step in gen.sampler.noise.steps:
            noisy = weaken(clean, [item["item_id"]], step, gen.seed, gen.sampler.noise.num_steps)
            out = runner.generate([item["llava_prompt"]], enc, noisy, gen.sampler.sampling,
                                  [sampling_seed(gen.seed, STRATEGY, item["item_id"], step)])
            pairs += filter_reason(item["answer"], out[0].text, gen.filters) is None
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds}


def pipeline(cfg, source: str, out: str) -> dict:
    from bpo_ray.generate.pipeline import run_generate

    t0 = time.perf_counter()
    manifest = run_generate(cfg, source, out, restart=True)
    seconds = time.perf_counter() - t0
    pairs = manifest.counts.pairs_written
    return {"seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds}


def noisy_vs_clean(cfg, source: str, n_items: int, backend: str, batch: int, repeats: int = 3) -> dict:
    """Generation time per generated token from noised vs clean features, same batches, in process.

    Random-init models stop at EOS at different points for different inputs, so the comparison
    is per generated token; clean and noisy runs alternate so machine load hits both alike. The
    noise op itself (``weaken``) is also timed alone.

    Per token, a noisy pass looks slower when some of its answers stop early: a batch generates
    until its longest answer ends, so its time stays and its token count drops (noisy passes here
    generate ~1.5 % fewer tokens). So the time per pass (the same batches, the same
    ``max_new_tokens``) is reported as well, as the median over the repeats: a pass's time varies
    by several percent from one pass to the next on a shared 2-core box, more than the noise op
    costs, and the best of a few repeats follows that spread.
    """
    from bpo_ray.generate.backends import MLLMRunner
    from bpo_ray.generate.image_loader import read_image
    from bpo_ray.generate.image_weakened import weaken
    from bpo_ray.generate.sources import read_source
    from bpo_ray.images import decode_image

    gen = cfg.generate
    runner = MLLMRunner(cfg.models.mllm, backend=backend, device="cpu")
    items = read_source(source, max_items=n_items).items
    images = [decode_image(read_image(it["image_uri"], gen.max_image_bytes)[0]) for it in items]
    batches = [(items[i:i + batch], images[i:i + batch]) for i in range(0, len(items), batch)]
    step = gen.sampler.noise.steps[0]

    def run(noisy: bool) -> tuple[float, int, float]:
        seconds = tokens = noise_s = 0.0
        for its, imgs in batches:
            prompts = [it["llava_prompt"] for it in its]
            t0 = time.perf_counter()
            enc = runner.encode(imgs, prompts)
            feats = runner.features(enc["pixel_values"])
            if noisy:
                t1 = time.perf_counter()
                feats = weaken(feats, [it["item_id"] for it in its], step, gen.seed, gen.sampler.noise.num_steps)
                noise_s += time.perf_counter() - t1
            outs = runner.generate(prompts, enc, feats, gen.sampler.sampling, [0] * len(its))
            seconds += time.perf_counter() - t0
            tokens += sum(max(1, len(o.token_ids)) for o in outs)
        return seconds, int(tokens), noise_s

    run(False)  # warm-up (first-call allocations, vLLM's first scheduling)
    clean, noisy = [], []
    for _ in range(repeats):
        clean.append(run(False))
        noisy.append(run(True))
    c = min(clean, key=lambda r: r[0] / r[1])
    n = min(noisy, key=lambda r: r[0] / r[1])
    median_pass = statistics.median(r[0] for r in noisy) / statistics.median(r[0] for r in clean)
    return {"clean_s": c[0], "clean_tokens": c[1], "noisy_s": n[0], "noisy_tokens": n[1], "noise_op_s": n[2],
            "clean_ms_per_token": 1000 * c[0] / c[1], "noisy_ms_per_token": 1000 * n[0] / n[1],
            "noisy_over_clean": (n[0] / n[1]) / (c[0] / c[1]), "noisy_over_clean_per_pass": median_pass,
            "noise_op_share": n[2] / n[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="LM size (module docstring)")
    ap.add_argument("--items", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per answer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of (loop, pipeline x2); best round reported")
    ap.add_argument("--no-loop", action="store_true",
                    help="skip the sequential loop (for long runs of the larger size, where it takes ~0.8 s an item); "
                         "the pipeline/loop ratio is then not printed")
    ap.add_argument("--noise-items", type=int, default=None,
                    help="items of the in-process noisy/clean comparison (default: --items)")
    ap.add_argument("--noise-repeats", type=int, default=3, help="clean/noisy repeats (per token: the best; per pass: the median)")
    ap.add_argument("--out", default=None, help="where to write the results JSON and run outputs")
    args = ap.parse_args()

    import ray

    from bpo_ray.config import load_config
    from bpo_ray.models.tiny import TinySpec, build_tiny_models
    from bpo_ray.world.build import build_world

    work = Path(args.out or tempfile.mkdtemp(prefix="bpo-bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = TinySpec(**SIZES[args.size])
    models = build_tiny_models(work / f"models-{args.size}", seed=0, spec=spec)
    build_world(str(work / "world"), n_scenes=max(40, args.items // 2))
    source = str(work / "world" / "train.jsonl")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

    def config(backend: str, tokens: int = args.tokens):
        pool = f"{{min_size: 1, max_size: 2, num_cpus: 0.5, batch_size: {args.batch}}}"
        return load_config("tiny", [
            f"models.mllm={models['mllm']}", f"models.text_llm={models['text_llm']}", "models.device=cpu",
            "generate.strategies=[image_weakened]", f"generate.max_items={args.items}", "generate.progress=false",
            f"generate.sampler.backend={backend}", f"generate.sampler.sampling.max_new_tokens={tokens}",
            f"generate.sampler.pool={pool}", "generate.shard_size=16",
        ])

    cfg = config("transformers")
    results = {"size": args.size, "lm": {k: getattr(spec, k) for k in ("lm_hidden", "lm_layers", "lm_heads",
                                                                        "lm_intermediate")},
               "items": args.items, "max_new_tokens": args.tokens, "batch_size": args.batch,
               "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    print(f"generate bench: {args.items} items, {args.tokens} new tokens, batch {args.batch}, "
          f"{os.cpu_count()} CPUs, {args.size} LLaVA (random init, LM {results['lm']}), "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    # Rounds alternate the runs so a load spike on a shared machine hits them alike; each
    # row reports its best round.
    runs: dict[str, list[dict]] = {"sequential_loop": [], "pipeline_transformers": [], "pipeline_vllm": [],
                                   "pipeline_floor": []}
    if args.no_loop:
        del runs["sequential_loop"], runs["pipeline_floor"]
    for r in range(args.rounds):
        if not args.no_loop:
            runs["sequential_loop"].append(sequential_loop(cfg, source, args.items))
        runs["pipeline_transformers"].append(pipeline(cfg, source, str(work / f"out-transformers-{r}")))
        runs["pipeline_vllm"].append(pipeline(config("vllm"), source, str(work / f"out-vllm-{r}")))
        if not args.no_loop:
            runs["pipeline_floor"].append(pipeline(config("transformers", tokens=1), source, str(work / f"out-floor-{r}")))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['pairs_per_s']:.2f} pairs/s" for k, v in runs.items())
              + f" (load average {os.getloadavg()[0]:.2f})", flush=True)
    for name, rs in runs.items():
        results[name] = dict(max(rs, key=lambda x: x["pairs_per_s"]), rounds=[x["pairs_per_s"] for x in rs])
    noise_items = args.noise_items or args.items
    results["noise_items"] = noise_items
    results["noise_transformers"] = noisy_vs_clean(cfg, source, noise_items, "transformers", args.batch,
                                                   args.noise_repeats)
    results["noise_vllm"] = noisy_vs_clean(cfg, source, noise_items, "vllm", args.batch, args.noise_repeats)

    seq, hf, vl = results.get("sequential_loop"), results["pipeline_transformers"], results["pipeline_vllm"]
    floor = results.get("pipeline_floor")
    rows = [("sequential loop (transformers)", seq), ("Ray Data pipeline, transformers", hf),
            ("Ray Data pipeline, vLLM", vl), ("pipeline floor (1-token answers)", floor)]
    rows = [(name, r) for name, r in rows if r is not None]
    print(f"\n{'run':36s} {'pairs':>6s} {'seconds':>8s} {'pairs/s':>8s}")
    for name, r in rows:
        print(f"{name:36s} {r['pairs']:6d} {r['seconds']:8.1f} {r['pairs_per_s']:8.2f}")
    nt, nv = results["noise_transformers"], results["noise_vllm"]
    for name, r in (("transformers", nt), ("vLLM", nv)):
        print(f"\nnoisy vs clean sampling ({name}, same batches): {r['noisy_ms_per_token']:.2f} vs "
              f"{r['clean_ms_per_token']:.2f} ms per generated token ({r['noisy_tokens']} / {r['clean_tokens']} tokens); "
              f"the noise op is {100 * r['noise_op_share']:.2f}% of the noisy run")
    ratios = {
        **({"pipeline_transformers / sequential_loop (pairs/s)": hf["pairs_per_s"] / seq["pairs_per_s"],
            "ceiling at this size: loop s / pipeline floor s": seq["seconds"] / floor["seconds"]} if seq else {}),
        "pipeline_vllm / pipeline_transformers (pairs/s)": vl["pairs_per_s"] / hf["pairs_per_s"],
        "noisy / clean time per token, transformers": nt["noisy_over_clean"],
        "noisy / clean time per token, vLLM": nv["noisy_over_clean"],
        "noisy / clean time per pass (median), transformers": nt["noisy_over_clean_per_pass"],
        "noisy / clean time per pass (median), vLLM": nv["noisy_over_clean_per_pass"],
    }
    results["ratios"] = ratios
    results["loadavg_end"] = os.getloadavg()
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:52s} {v:6.2f}x")
    print(f"\nload average (1, 5, 15 min): start {results['loadavg_start']}, end {results['loadavg_end']}")
    (work / f"bench_generate_{args.size}.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {work / f'bench_generate_{args.size}.json'}")
    ray.shutdown()


if __name__ == "__main__":
    main()
