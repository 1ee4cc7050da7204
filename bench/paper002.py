"""bench/paper002.py: Li et al. 2024's Table 2 and Fig. 2 in miniature, in the bias world, in one command.

    .venv/bin/python bench/paper002.py --out runs/paper002 [--from runs/science/seed0] [--items 400]

From a world and its base model (built here, or copied from ``--from``, e.g. a demo / science seed
directory; the source is only read) to the comparison, on a local Ray cluster, each stage a Ray job
(``python -m bpo_ray <stage>``) as in ``bpo-ray demo``:

1. annotate: ``generate`` with ``judge_ranked`` only: 4 completions per item at temperature 0.7,
   rated on the five HelpSteer attributes by the world's annotator -> ``annotations/`` + ``pairs/``;
2. derive the training sets (``bpo-ray derive``): rejection sampling, SteerLM, judge-answer SFT
   (the annotator answers each question itself), DPO on 25 / 50 / 75 / 100 % of the pairs;
3. train each (``train.mode=sft`` or ``dpo``, the demo's sizes; DPO is the paper's plain Eq. 4);
4. serve base + every adapter, the judge proxy in front of the world's annotator; ``evaluate`` the
   world's image benchmarks (CHAIR, POPE, MM-Vet, LLaVA-Bench) and the text benchmarks through the
   served model and the judge proxy: the world's MT-Bench-format questions (text only, with a blank
   image, with a random image) and an AlpacaEval-style win rate against the base model's outputs;
5. print and write ``OUT/paper002.md`` / ``.json`` (Table 2: base, judge-answer SFT, rejection
   sampling, SteerLM, DPO) and ``OUT/datasize.png`` (each benchmark against DPO data size).

One draw (one world, one seed): it says what this pipeline does on this world, not which method
is better in general. About 20 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bpo_ray.demo import DEMO_CONFIG, ensure_judge_tokens, world_annotator  # noqa: E402
from bpo_ray.localcluster import LocalCluster, free_port, submit_and_wait  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
#: Table 2's rows: name -> (derive method, train mode, fraction)
METHODS = {"judge_answer_sft": ("judge_answer", "sft", 1.0), "rejection_sampling": ("rejection_sampling", "sft", 1.0),
           "steerlm": ("steerlm", "sft", 1.0),
           **{f"dpo_{int(f * 100)}": ("dpo", "dpo", f) for f in FRACTIONS}}
TABLE_ROWS = ("base", "judge_answer_sft", "rejection_sampling", "steerlm", "dpo_100")
IMAGE_BENCHMARKS = ("chair", "pope", "mmvet", "llava_bench")
#: What SteerLM asks for at inference (SteerLM's usual choice: the best of each quality attribute,
#: complexity and verbosity as the world's reference answers have them).
STEER = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 3, "verbosity": 2}


def columns(metrics: dict, text: dict) -> dict[str, float]:
    b = metrics["benchmarks"]
    return {"MM-Vet": b["mmvet"]["total"], "LLaVA-Bench": b["llava_bench"]["all"]["relative"],
            "POPE F1": 100 * b["pope"]["mean"]["f1"], "CHAIR_i": 100 * b["chair"]["chair_i"],
            "MT-Bench": text["mtbench_none"]["score"], "MT-Bench blank img": text["mtbench_blank"]["score"],
            "MT-Bench random img": text["mtbench_random"]["score"], "AlpacaEval win %": text["alpaca_eval"]["win_rate"]}


def markdown(rows: dict[str, dict[str, float]], title: str) -> str:
    cols = list(next(iter(rows.values())))
    lines = [f"### {title}", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def plot_datasize(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(next(iter(rows.values())))
    xs = [0] + [int(f * 100) for f in FRACTIONS]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), constrained_layout=True)
    for ax, col in zip(axes.flat, cols):
        ax.plot(xs, [rows["base"][col]] + [rows[f"dpo_{x}"][col] for x in xs[1:]], marker="o")
        ax.set_title(col)
        ax.set_xlabel("DPO pairs used (%)")
        ax.set_xticks(xs)
    fig.suptitle("Li et al. 2024 Fig. 2 in miniature: benchmarks against DPO data size (0 % = base)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def text_benchmarks(model_url: str, judge_url: str, model: str, questions, reference, seed: int,
                    steer: bool) -> dict:
    from bpo_ray.evaluate.judge import Secret
    from bpo_ray.evaluate.text_bench import Endpoints, run_alpaca_eval, run_mtbench
    from bpo_ray.serving.judge.client import client_token

    ep = Endpoints(model_url, model, judge_url, Secret(client_token()), judge_model="bias-world-annotator",
                   max_tokens=48, extra_body={"steer_attributes": STEER} if steer else None)
    out, details = {}, {}
    for mode in ("none", "blank", "random"):
        out[f"mtbench_{mode}"], details[f"mtbench_{mode}"] = run_mtbench(questions, ep, image_mode=mode, seed=seed)
    out["alpaca_eval"], details["alpaca_eval"] = run_alpaca_eval(reference, ep, seed=seed)
    return out, details


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/paper002")
    ap.add_argument("--from", dest="source", default=None,
                    help="reuse this run's world/ and models/ (copied; the source is only read)")
    ap.add_argument("--config", default=DEMO_CONFIG, help="default: the demo's config (configs/demo.yaml)")
    ap.add_argument("--seed", type=int, default=0, help="world / generate / train seed")
    ap.add_argument("--items", type=int, default=400, help="training items annotated (4 completions each)")
    ap.add_argument("--text-questions", type=int, default=24, help="world MT-Bench-format questions")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--num-cpus", type=int, default=4)
    args = ap.parse_args(argv)

    from bpo_ray.evaluate.benchmarks import alpaca_eval, mtbench
    from bpo_ray.generate.derive import derive

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    timings: dict[str, float] = {}
    if args.source and not (out / "models" / "base_model.json").exists():
        src = Path(args.source).resolve()
        for part in ("world", "models"):
            shutil.copytree(src / part, out / part, dirs_exist_ok=True)
    models = out / "models"
    shared = ["--config", args.config, "--set", f"storage.root={out}", "--set", f"world.out={out / 'world'}",
              "--set", f"models.mllm={models / 'llava'}", "--set", f"models.text_llm={models / 'text_lm'}"]
    for o in (f"world.seed={args.seed}", f"generate.seed={args.seed}", f"train.seed={args.seed}",
              *args.overrides):
        shared += ["--set", o]

    def stage(label: str, name: str, stage_args: list[str], done: Path | None = None) -> None:
        if done is not None and done.exists():
            print(f"[paper002] {label}: reused ({done})", flush=True)
            return
        print(f"\n======== {label}", flush=True)
        t0 = time.time()
        submit_and_wait(cluster.dashboard_url, name, stage_args)
        timings[label] = round(time.time() - t0, 1)

    ensure_judge_tokens()
    port = free_port()
    with LocalCluster(num_cpus=args.num_cpus) as cluster:
        stage("world build + base model", "world", ["build", "--out", str(out / "world"), *shared],
              done=models / "base_model.json")
        with world_annotator(out / "world", out / "world_annotator.log") as annotator_url:
            gen = out / "generate"
            stage("annotate (judge_ranked, 5 attributes)", "generate", [
                *shared, "--source", str(out / "world" / "train.jsonl"), "--images", str(out / "world"),
                "--out", str(gen), "--set", "generate.strategies=[judge_ranked]",
                "--set", f"generate.sample_items={args.items}",
                "--set", f"generate.judge_ranked.judge_url={annotator_url}",
                "--set", "generate.judge_ranked.judge_model=bias-world-annotator",
                "--set", "generate.judge_ranked.sampling.max_new_tokens=48",
                "--set", "generate.judge_ranked.pool={min_size: 1, max_size: 2, num_cpus: 0.5, batch_size: 16}"],
                done=gen / "manifest.json")
            t0 = time.time()
            derived = {}
            for name, (method, _, fraction) in METHODS.items():
                # the judge client's token: the run's own (ensure_judge_tokens); the annotator takes any
                kw = {"judge_url": annotator_url, "judge_model": "bias-world-annotator"} if method == "judge_answer" else {}
                m = derive(method, str(gen), str(out / "sets" / name), fraction=fraction, seed=args.seed, **kw)
                derived[name] = m.counts.model_dump()
                print(f"[paper002] derive {name}: {m.counts.pairs_written} rows from {m.counts.items_in} items", flush=True)
            timings["derive"] = round(time.time() - t0, 1)
            for name, (_, mode, _) in METHODS.items():
                stage(f"train {name}", "train", [*shared, "--pairs", str(out / "sets" / name),
                                                 "--out", str(out / "train" / name), "--set", f"train.mode={mode}"],
                      done=out / "train" / name / "manifest.json")

            judge = ["--set", f"serve.judge.upstream_base_url={annotator_url}",
                     "--set", "serve.judge.upstream_key_env=BPO_WORLD_ANNOTATOR_KEY",
                     "--set", f"serve.judge.cache_path={out / 'judge_cache.sqlite'}"]
            served = [a for name in METHODS for a in ("--adapter", f"{name}={out / 'train' / name / 'adapter'}")]
            stage("serve (detached)", "serve", [*shared, *judge, *served, "--port", str(port), "--detach"])
            url = f"http://127.0.0.1:{port}"
            benchmarks = f"evaluate.benchmarks=[{','.join(IMAGE_BENCHMARKS)}]"
            names = ["base", *METHODS]
            for model in names:
                stage(f"evaluate {model}", "evaluate", [*shared, "--model-url", f"{url}/v1", "--model", model,
                                                        "--judge-url", f"{url}/judge/v1", "--set", benchmarks,
                                                        "--out", str(out / "eval")],
                      done=out / "eval" / model / "metrics.json")

            # text benchmarks: the world's MT-Bench-format questions; AlpacaEval against the base model
            qfile = out / "text" / "question.jsonl"
            qfile.parent.mkdir(parents=True, exist_ok=True)
            mtbench.write_questions(mtbench.world_questions(args.text_questions, args.seed), str(qfile))
            questions = mtbench.load_questions(str(qfile)).questions
            t0 = time.time()
            from bpo_ray.evaluate.judge import Secret
            from bpo_ray.evaluate.text_bench import Endpoints, answer_instructions

            ref_file = out / "text" / "alpaca_reference_base.json"
            if not ref_file.exists():
                base_ep = Endpoints(f"{url}/v1", "base", f"{url}/judge/v1", Secret(""), max_tokens=48)
                answer_instructions([q.turns[0] for q in questions], base_ep, "base", str(ref_file))
            reference = alpaca_eval.load_reference(str(ref_file)).items
            text = {}
            for m in names:
                text[m], details = text_benchmarks(f"{url}/v1", f"{url}/judge/v1", m, questions, reference,
                                                   args.seed, steer=m == "steerlm")
                (out / "text" / f"details_{m}.json").write_text(json.dumps(details, indent=1))
            (out / "text" / "metrics.json").write_text(json.dumps(text, indent=1))
            timings["text benchmarks"] = round(time.time() - t0, 1)

    rows = {m: columns(json.loads((out / "eval" / m / "metrics.json").read_text()), text[m]) for m in names}
    table = {("dpo" if m == "dpo_100" else m): rows[m] for m in TABLE_ROWS}
    curve = {m: rows[m] for m in ["base", *[f"dpo_{int(f * 100)}" for f in FRACTIONS]]}
    plot_datasize(rows, out / "datasize.png")
    timings["total"] = round(time.time() - t_all, 1)
    gen_counts = json.loads((out / "generate" / "manifest.json").read_text())["counts"]
    md = "\n\n".join([
        "# Li et al. 2024 in miniature (bias world, one draw)",
        f"Annotation: {gen_counts['items_in']} items, {gen_counts['annotations_written']} rated completions, "
        f"{gen_counts['pairs_written']} DPO pairs (gap >= 2), {gen_counts['quarantined']} quarantined. "
        "Training rows: " + ", ".join(f"{k} {v['pairs_written']}" for k, v in derived.items()) + ".",
        markdown(table, "Table 2 (miniature): MM-Vet 0-100, LLaVA-Bench relative %, POPE F1 %, CHAIR_i % "
                 "(lower is better), MT-Bench 1-10 (world text questions, not MT-Bench), AlpacaEval win % vs base"),
        markdown(curve, "Fig. 2 (miniature): DPO on 25/50/75/100 % of the pairs (datasize.png)"),
        f"SteerLM is asked for {STEER} at inference. Timings (s): {json.dumps(timings)}"])
    (out / "paper002.md").write_text(md + "\n")
    (out / "paper002.json").write_text(json.dumps({"table": table, "curve": curve, "derived": derived,
                                                   "generate": gen_counts, "timings_s": timings}, indent=1))
    print("\n" + md)
    print(f"\n[paper002] wrote {out / 'paper002.md'}, {out / 'paper002.json'}, {out / 'datasize.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
