"""bench/science.py: the demo pipeline over several seeds, mean ± sd per model.

    .venv/bin/python bench/science.py [--seeds 0 1 2] [--out runs/science] [--set KEY=VALUE ...]

Seed ``s`` builds its own world and base model (``world.seed``), samples its own pairs
(``generate.seed``) and trains with its own seed (``train.seed``); everything else is the demo's
configuration (``configs/demo.yaml``, ``bpo_ray.demo``). Each seed is a full ``bpo-ray demo`` run under
``OUT/seed<s>``; the finished stages of a seed run before are kept (``bpo-ray demo --reuse``), so a
new variant adds only its own stages (``--rerun`` runs everything again).
Prints the table of mean ± sd over seeds for every model and column of the demo's report
(CHAIR_s, CHAIR_i, object recall, well-formed captions, POPE accuracy / F1 / yes %), the per-seed
CHAIR_i, and whether the BPO targets hold (``bpo_ray.evaluate.multiseed.check_targets``); writes
``OUT/science.{md,json}``. About 15 minutes a seed on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def seed_overrides(seed: int) -> list[str]:
    return [f"world.seed={seed}", f"generate.seed={seed}", f"train.seed={seed}"]


def main() -> int:
    from bpo_ray.demo import DEMO_CONFIG, run_demo
    from bpo_ray.evaluate.multiseed import (CHAIR_I, aggregate, check_targets, paired_deltas, read_headline,
                                            targets_markdown)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/science")
    ap.add_argument("--config", default=DEMO_CONFIG, help="default: the demo's config (configs/demo.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rerun", action="store_true", help="run every stage of every seed again, even if it finished before")
    args = ap.parse_args()
    if len(args.seeds) < 3:
        print("science: fewer than 3 seeds; the table will say so, but a claim needs >= 3", file=sys.stderr)

    out = Path(args.out).resolve()
    per_seed, walls = {}, {}
    for seed in args.seeds:
        run = out / f"seed{seed}"
        summary_path = run / "demo_summary.json"
        # A seed run before keeps its finished stages; only what is missing runs (e.g. a new variant).
        reuse = not args.rerun and run.exists()
        print(f"\n######## science: seed {seed} -> {run}{' (reusing finished stages)' if reuse else ''}", flush=True)
        t0 = time.time()
        run_demo(run, args.config, [*seed_overrides(seed), *args.overrides], reuse=reuse)
        print(f"######## science: seed {seed} done in {time.time() - t0:.0f} s", flush=True)
        summary = json.loads(summary_path.read_text())
        walls[seed] = summary["timings_s"]["total"]
        per_seed[seed] = read_headline(summary["report"].replace("report.md", "report.json"))

    table = aggregate(per_seed)
    targets = [t for name in ("bpo", "bpo_plain_dpo") if name in table.cells for t in check_targets(table, bpo=name)]
    if "onpolicy" in table.cells:
        # issue #16's targets: >= 60 % lower mean CHAIR_i, recall >= base - 2, fluency >= base, below BPO
        targets += check_targets(table, bpo="onpolicy", ablation="bpo" if "bpo" in table.cells else None,
                                 min_relative_drop=0.60)
    per_seed_chair = "\n".join(
        f"| {model} | " + " | ".join(f"{v:.1f}" for v in table.cells[model][CHAIR_I].values) + " |"
        for model in table.models)
    text = "\n".join([
        f"# Science benchmark: {len(table.seeds)} seeds ({', '.join(map(str, table.seeds))}), mean ± sd",
        "",
        "Each seed: its own world and base model, its own pairs and training seed; the demo's configuration.",
        f"Wall time per seed (s): {', '.join(f'{s}: {w:.0f}' for s, w in walls.items())}.",
        "",
        table.markdown(),
        "",
        "Change against base on the same seed (mean ± sd over seeds; per seed in brackets):",
        "",
        paired_deltas(table),
        "",
        "CHAIR_i per seed:",
        "",
        "| Model | " + " | ".join(f"seed {s}" for s in table.seeds) + " |",
        "|---|" + "---:|" * len(table.seeds),
        per_seed_chair,
        "",
        "Targets:",
        "",
        targets_markdown(targets),
        "",
    ])
    out.mkdir(parents=True, exist_ok=True)
    (out / "science.md").write_text(text)
    (out / "science.json").write_text(json.dumps({**table.to_json(), "wall_s": walls,
                                                  "targets": [t.__dict__ for t in targets]}, indent=2))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
