"""``bpo-ray demo``: every stage end to end on the embedded default, on a local Ray cluster.

From an empty directory to a report: world build (data + base model), generate (image-weakened
and error-injected negatives; and on-policy verifier-labelled pairs), reference log-probs, train
(the BPO recipe, plain DPO, the no-weakening ablation, the SFT baseline and on-policy DPO), serve
(base + every adapter by name, and the judge proxy in front of the world's annotator), evaluate
(CHAIR, POPE, and the judged MM-Vet, LLaVA-Bench and MMHal-Bench on the bias world's test split)
and the comparison report.

The judge: the world's annotator (``bpo_ray.world.judge_server``) grades answers from the scenes'
ground truth, as a person who sees the scene would; it runs on loopback beside the cluster and the
judge proxy forwards to it as it would to GPT-4 (cache, rate limits, usage accounting all real).

The demo's settings (its world, its sizes) are the named config ``demo`` (``configs/demo.yaml``:
``tiny`` plus those settings), so any stage runs with them on its own (``--config demo``); what
differs between the variants it trains is here (``VARIANTS``, ``ONPOLICY_GENERATE``).

The demo is one draw (one world seed, one training seed); ``bench/science.py`` runs it over
several seeds and prints mean ± sd. Every process pins its CPU kernels (``numerics`` in the tiny
config), so two runs print the same report, on AVX2 and AVX-512 CPUs alike.

Each stage is submitted to a real local Ray cluster (``ray start --head``) through Ray's Job
Submission API with the same ``python -m bpo_ray <stage>`` entrypoint ``ray job submit`` runs on a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from bpo_ray.localcluster import LocalCluster, free_port, submit_and_wait

BOTH = ["image_weakened", "error_injection"]
#: The diffusion step of the image-weakened negatives the BPO variants train on: the larger of the
#: two steps the demo's generate run samples (``generate.sampler.noise.steps`` in
#: ``configs/demo.yaml``, which says why 800).
NOISE_STEP = 800

# name -> (train.mode, strategies used, extra train overrides). Every variant trains on pairs from
# the same generate run, which samples image-weakened negatives at step 0 and NOISE_STEP.
VARIANTS: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    # The project's BPO recipe: the paper's pairs (both strategies), DPO (Eq. 4) plus an NLL
    # anchor on the chosen answer (TRL's rpo_alpha). Plain DPO lowers the ground truth's
    # log-prob as well and can wreck the captions (docs/world.md, docs/science.md).
    "bpo": ("dpo", BOTH, ("train.sft_weight=1.0", f"train.noise_steps=[{NOISE_STEP}]")),
    # The paper's loss alone (Eq. 4, no anchor), same pairs.
    "bpo_plain_dpo": ("dpo", BOTH, (f"train.noise_steps=[{NOISE_STEP}]",)),
    # Table 5's ablation: self-generated negatives without weakening (noise step 0), same recipe.
    "bpo_no_weakening": ("dpo", BOTH, ("train.sft_weight=1.0", "train.noise_steps=[0]")),
    # SFT on the chosen answers of the same pairs (the paper's Table 4 baseline).
    "sft": ("sft", BOTH, (f"train.noise_steps=[{NOISE_STEP}]",)),
    # On-policy, verifier-labelled sentence-level pairs (issue #16; RLAIF-V / SENTINEL): the base
    # model's own captions, the annotations verifier over the world's scene objects, from their
    # own generate run (ONPOLICY_GENERATE). ~450 pairs, so 4 epochs; the NLL anchor on the
    # (on-policy, grounded) chosen side keeps fluency: without it, well-formed captions fell from
    # 99 % to 67 % on the seed-0 world (docs/generate.md, "On-policy: measured").
    "onpolicy": ("dpo", ["on_policy"], ("train.sft_weight=1.0", "train.epochs=4")),
}

#: Variants trained on pairs of their own generate run (variant -> output folder under the demo's).
OWN_PAIRS: dict[str, str] = {"onpolicy": "generate_onpolicy"}

#: The on-policy generate run: descriptions only (the strategy needs object mentions), K = 4
#: samples at temperature 0.7 up to the evaluation's 96 tokens, the annotations verifier (the
#: records' scene objects, the world's synonyms). About 2 minutes on 2 cores (docs/generate.md).
ONPOLICY_GENERATE: tuple[str, ...] = (
    "generate.strategies=[on_policy]",
    "generate.sample_items=4800",
    "generate.on_policy.item_sources=[caption]",
    "generate.on_policy.num_samples=4",
    "generate.on_policy.num_continuations=4",
    "generate.on_policy.sampling.max_new_tokens=96",
    "generate.on_policy.pool={min_size: 1, max_size: 2, num_cpus: 0.5, batch_size: 16}",
)


#: The demo's settings: a named config, the tiny one plus the demo's world and sizes (its comments
#: say why each); ``bpo-ray <stage> --config demo`` runs any stage with them.
DEMO_CONFIG = "demo"
#: Rule-scored benchmarks the demo adds to the evaluate config's default list (world files in the
#: public formats, ``bpo_ray.world.public_files``).
FILE_BENCHMARKS: tuple[str, ...] = ("objhal", "amber")
#: Benchmarks that need the judge; the demo adds them too.
JUDGE_BENCHMARKS: tuple[str, ...] = ("mmvet", "llava_bench", "mmhal")


def demo_benchmarks() -> list[str]:
    """The evaluate config's default benchmarks, then Object HalBench, AMBER and every judged one:
    every benchmark bpo-ray has."""
    from bpo_ray.config.evaluate import EvaluateConfig

    defaults = list(EvaluateConfig().benchmarks)
    return defaults + [b for b in FILE_BENCHMARKS + JUDGE_BENCHMARKS if b not in defaults]


def ensure_judge_tokens() -> None:
    """A fresh judge-proxy client token for this run, in the environment the local cluster (and so
    the judge proxy and the evaluate jobs) inherits; tokens the user already set are kept (the
    evaluate client falls back to the first of ``BPO_JUDGE_TOKENS``). Never printed."""
    if not os.environ.get("BPO_JUDGE_TOKENS"):
        token = os.environ.get("BPO_JUDGE_TOKEN") or secrets.token_urlsafe(24)
        os.environ["BPO_JUDGE_TOKENS"] = f"demo:{token}"
        os.environ.setdefault("BPO_JUDGE_TOKEN", token)


@contextmanager
def world_annotator(world_dir: Path, log: Path, timeout_s: float = 120) -> Iterator[str]:
    """Run the world's annotator (``bpo-ray world judge``) on a free loopback port; yields its /v1 URL."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with open(log, "ab") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "bpo_ray.world.judge_server", "--world", str(world_dir),
                                 "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the world annotator exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the world annotator did not answer at {url} within {timeout_s:.0f} s; see {log}")
            time.sleep(0.5)
        print(f"[demo] world annotator (judge upstream) at {url}", flush=True)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def still_to_evaluate(metrics_path: Path, evaluate_cfg: Any) -> list[str]:
    """The demo's benchmarks that a model's ``metrics.json`` lacks or scored under other evaluate
    settings (all of them when it does not exist)."""
    from bpo_ray.evaluate.pipeline import stale_benchmarks

    earlier = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    return stale_benchmarks(earlier, evaluate_cfg.model_copy(update={"benchmarks": demo_benchmarks()}))


def serve_and_evaluate(stage: Callable[..., None], out: Path, shared: list[str],
                       adapters: dict[str, Path], port: int, evaluate_cfg: Any = None) -> None:
    """The demo's serve and evaluate steps: the world's annotator on loopback, the serve stage
    (base + ``adapters`` by name, and the judge proxy forwarding to the annotator), then one
    evaluate job per model with every benchmark, the judged ones through the proxy.

    ``stage(label, job, args)`` submits one stage job and waits for it. With ``evaluate_cfg`` (the
    resolved ``evaluate`` config; ``--reuse``), a model is evaluated only on the benchmarks its
    metrics lack or scored under other settings, and the others are kept (``evaluate --add``);
    nothing is served when no model has any left.
    """
    todo = {m: (still_to_evaluate(out / "eval" / m / "metrics.json", evaluate_cfg) if evaluate_cfg is not None
                else demo_benchmarks()) for m in ["base", *adapters]}
    models = [m for m, names in todo.items() if names]
    if not models:
        print("[demo] serve + evaluate: every model's metrics exist; reused", flush=True)
        return
    with world_annotator(out / "world", out / "world_annotator.log") as annotator_url:
        # The annotator needs no key: name an unset variable so no real OpenAI key ever leaves for it.
        judge = ["--set", f"serve.judge.upstream_base_url={annotator_url}",
                 "--set", "serve.judge.upstream_key_env=BPO_WORLD_ANNOTATOR_KEY",
                 "--set", f"serve.judge.cache_path={out / 'judge_cache.sqlite'}"]
        served = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]
        stage("serve (detached)", "serve", [*shared, *judge, *served, "--port", str(port), "--detach"])
        url = f"http://127.0.0.1:{port}"
        for model in models:
            adding = len(todo[model]) < len(demo_benchmarks())
            label = f"evaluate {model}" + (f" ({', '.join(todo[model])})" if adding else "")
            stage(label, "evaluate", [*shared, "--model-url", f"{url}/v1", "--model", model,
                                      "--judge-url", f"{url}/judge/v1", "--set",
                                      f"evaluate.benchmarks=[{','.join(todo[model])}]",
                                      "--out", str(out / "eval"), *(["--add"] if adding else [])])


def _banner(text: str) -> None:
    print(f"\n{'=' * 8} {text} {'=' * max(4, 70 - len(text))}", flush=True)


SETTINGS_FILE = "demo_settings.json"


class DemoError(RuntimeError):
    """The demo cannot run as asked (e.g. ``--reuse`` over a run made with other settings)."""


def demo_settings(config: str, overrides: Sequence[str]) -> dict:
    """What ``demo_settings.json`` records: the config and overrides as given, and the config they
    resolve to (``resolved``), which ``--reuse`` compares. Raises ``ConfigError`` on a bad one."""
    from bpo_ray.config import load_config

    return {"config": config, "overrides": list(overrides),
            "resolved": load_config(config, overrides).model_dump(mode="json")}


def _resolved(settings: dict) -> dict:
    """The resolved config of recorded settings; a file from before ``resolved`` was recorded (its
    overrides then held the demo's settings too, on ``tiny``) is resolved again."""
    if "resolved" in settings:
        return settings["resolved"]
    return demo_settings(settings["config"], settings["overrides"])["resolved"]


def _resolved_evaluate(settings: dict) -> Any:
    """The ``evaluate`` config that ``settings`` (``demo_settings``) resolved to."""
    from bpo_ray.config.evaluate import EvaluateConfig

    return EvaluateConfig.model_validate(settings["resolved"]["evaluate"])


def _check_reuse(out: Path, settings: dict) -> None:
    """Refuse to reuse stages of a run whose settings resolve to another config (however they were
    spelled: a named config or ``--set`` overrides). The ``evaluate`` section is not compared here:
    each model's ``metrics.json`` records the settings it was scored under, and only benchmarks
    scored under other ones are evaluated again (``still_to_evaluate``).

    A run made before the settings were recorded is reused as it is, with a warning."""
    from bpo_ray.config import ConfigError, config_differences

    path = out / SETTINGS_FILE
    if path.exists():
        before = json.loads(path.read_text())
        try:
            changed = config_differences(*({k: v for k, v in c.items() if k != "evaluate"}
                                           for c in (_resolved(before), settings["resolved"])))
        except ConfigError as exc:
            raise DemoError(f"--reuse: the settings {out} was made with ({path}) no longer load: {exc}") from None
        if changed:
            raise DemoError(f"--reuse: {out} was made with other settings ({path}): {'; '.join(changed)}. "
                            "Use another --out, or run without --reuse.")
    elif any(out.iterdir()):
        print(f"[demo] WARNING --reuse: {out} has no {SETTINGS_FILE}; reusing its finished stages unchecked", flush=True)


def _sets(overrides: Sequence[str]) -> list[str]:
    """``--set o`` for each override, as a stage's arguments."""
    return [arg for o in overrides for arg in ("--set", o)]


def run_demo(out: Path, config: str = DEMO_CONFIG, overrides: Sequence[str] = (), num_cpus: int = 4,
             reuse: bool = False) -> dict:
    """Run the demo under ``out`` with ``config`` (the demo's own by default) and ``overrides``.
    With ``reuse``, a stage whose output is already complete there (world, pairs, reference, an
    adapter, a model's metrics) is not run again; the others run as usual, so a run can be
    continued or extended with a new variant. Raises ``ConfigError`` on a bad config or override."""
    out = out.resolve()
    settings = demo_settings(config, overrides)
    out.mkdir(parents=True, exist_ok=True)
    if reuse:
        _check_reuse(out, settings)
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    models = out / "models"
    shared = ["--config", config, "--set", f"storage.root={out}", "--set", f"world.out={out / 'world'}",
              "--set", f"models.mllm={models / 'llava'}",
              "--set", f"models.text_llm={models / 'text_lm'}", *_sets(overrides)]
    timings: dict[str, float] = {}
    summary_path = out / "demo_summary.json"
    # A reused stage keeps the wall time it took when it ran.
    earlier = json.loads(summary_path.read_text())["timings_s"] if reuse and summary_path.exists() else {}
    t_all = time.time()

    def stage(label: str, name: str, args: list[str], done: Optional[Path] = None) -> None:
        """Submit one stage as a Ray job; ``done`` is the file the finished stage leaves behind."""
        if reuse and done is not None and done.exists():
            print(f"[demo] {label}: reused ({done} exists)", flush=True)
            timings[label] = float(earlier.get(label, 0.0))
            return
        _banner(label)
        t0 = time.time()
        submit_and_wait(cluster.dashboard_url, name, args)
        timings[label] = round(time.time() - t0, 1)
        print(f"[demo] {label}: {timings[label]} s", flush=True)

    port = free_port()
    ensure_judge_tokens()  # before the cluster starts: its processes inherit the environment
    with LocalCluster(num_cpus=num_cpus) as cluster:
        print(f"[demo] local Ray cluster up: {cluster.address} (dashboard {cluster.dashboard_url})", flush=True)
        stage("world build + base model", "world", ["build", "--out", str(out / "world"), *shared],
              done=models / "base_model.json")
        stage("generate pairs", "generate", [*shared, "--source", str(out / "world" / "train.jsonl"),
                                               "--images", str(out / "world"), "--out", str(out / "generate")],
              done=out / "generate" / "manifest.json")
        stage("reference log-probs", "reference", [*shared, "--pairs", str(out / "generate"), "--out", str(out / "reference")],
              done=out / "reference" / "manifest.json")
        stage("generate on-policy pairs", "generate", [
            *shared, "--source", str(out / "world" / "train.jsonl"), "--images", str(out / "world"),
            "--out", str(out / OWN_PAIRS["onpolicy"]), *_sets(ONPOLICY_GENERATE)],
              done=out / OWN_PAIRS["onpolicy"] / "manifest.json")
        for name, (mode, strategies, extra) in VARIANTS.items():
            pairs = out / OWN_PAIRS.get(name, "reference")
            stage(f"train {name}", "train", [*shared, "--pairs", str(pairs), "--out", str(out / "train" / name),
                                             "--set", f"train.mode={mode}",
                                             "--set", f"train.strategies=[{','.join(strategies)}]",
                                             *_sets(extra)],
                  done=out / "train" / name / "manifest.json")
        adapters = {name: out / "train" / name / "adapter" for name in VARIANTS}
        serve_and_evaluate(stage, out, shared, adapters, port, _resolved_evaluate(settings) if reuse else None)
    # "total" is what the whole run cost: the sum of its stages, whenever they ran.
    timings["total"] = round(sum(timings.values()), 1)
    summary = {"out": str(out), "report": str(out / "eval" / "report.md"), "timings_s": timings,
               "this_invocation_s": round(time.time() - t_all, 1)}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    from bpo_ray.config.args import stage_parser

    # No --address: the demo starts its own local cluster and runs every stage on it.
    ap = stage_parser("demo", __doc__.splitlines()[0], out_help="output directory (default: runs/demo)",
                      out_required=False, out_default="runs/demo", config_default=DEMO_CONFIG, address=False)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray head")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the finished stages of an earlier run in --out (same resolved settings) and run the rest")
    return ap


def main(argv: Sequence[str]) -> int:
    from bpo_ray.config import ConfigError
    from bpo_ray.config.args import stage_error

    args = build_parser().parse_args(list(argv))
    try:
        summary = run_demo(Path(args.out), args.config, args.overrides, args.num_cpus, reuse=args.reuse)
    except (DemoError, ConfigError) as exc:
        return stage_error("demo", exc)
    _banner("demo finished")
    report = Path(summary["report"])
    if report.exists():
        print(report.read_text())
    print(f"[demo] everything is under {summary['out']}")
    for label, secs in summary["timings_s"].items():
        print(f"  {label:32s} {secs:8.1f} s")
    return 0
