"""Mean ± sd over seeds: the table a model-quality claim quotes (never one run).

``headline`` values come from each seed's ``report.json`` (``bpo_ray.evaluate.report``): model ->
column -> value in percent. ``aggregate`` turns ``{seed: headline}`` into per-model, per-column
mean, sample standard deviation and the per-seed values; ``check_targets`` tests the BPO targets
of the science benchmark against it (issue #15): every seed, not only the mean.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from bpo_ray import storage

CHAIR_I = "CHAIR_i (Obj) ↓"
RECALL = "Obj recall"
FLUENCY = "Well-formed %"


@dataclass
class Stat:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else float("nan")

    def __str__(self) -> str:
        return f"{self.mean:.1f} ± {self.sd:.1f}"


@dataclass
class SeedTable:
    seeds: list[int]
    models: list[str]
    columns: list[str]
    cells: dict[str, dict[str, Stat]] = field(default_factory=dict)  # model -> column -> Stat

    def markdown(self) -> str:
        head = ["Model"] + self.columns
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(self.columns)) + "|"]
        for model in self.models:
            row = [model] + [str(self.cells[model][c]) if c in self.cells[model] else "–" for c in self.columns]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "models": {m: {c: {"mean": s.mean, "sd": s.sd, "values": s.values}
                                                    for c, s in cols.items()} for m, cols in self.cells.items()}}


def paired_deltas(table: SeedTable, base: str = "base", columns: Sequence[str] = (CHAIR_I, RECALL, FLUENCY)) -> str:
    """Markdown: each model's change against ``base`` *on the same seed*, mean ± sd over seeds.

    Worlds differ a lot between seeds (the base model's CHAIR_i spans 2-8 %), so the spread of a
    model's own column mostly measures the worlds; the paired change is what a method does.
    """
    cols = [c for c in columns if c in table.cells.get(base, {})]
    lines = ["| Model | " + " | ".join(f"Δ {c}" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for model in table.models:
        if model == base:
            continue
        cells = []
        for c in cols:
            if c not in table.cells[model]:
                cells.append("–")
                continue
            d = Stat([m - b for m, b in zip(table.cells[model][c].values, table.cells[base][c].values)])
            cells.append(f"{d.mean:+.1f} ± {d.sd:.1f} ({', '.join(f'{v:+.1f}' for v in d.values)})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_headline(report_json: str) -> dict[str, dict[str, Optional[float]]]:
    return json.loads(storage.read_text(report_json))["headline"]


def aggregate(per_seed: Mapping[int, Mapping[str, Mapping[str, Optional[float]]]]) -> SeedTable:
    """``{seed: {model: {column: value}}}`` -> a SeedTable over the models every seed has."""
    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError("no seeds to aggregate")
    models = [m for m in per_seed[seeds[0]] if all(m in per_seed[s] for s in seeds)]
    columns = [c for c in per_seed[seeds[0]][models[0]]] if models else []
    table = SeedTable(seeds, models, columns)
    for model in models:
        table.cells[model] = {}
        for column in columns:
            values = [per_seed[s][model].get(column) for s in seeds]
            if all(isinstance(v, (int, float)) for v in values):
                table.cells[model][column] = Stat([float(v) for v in values])
    return table


@dataclass
class Target:
    claim: str
    met: bool
    detail: str


def check_targets(table: SeedTable, bpo: str = "bpo", base: str = "base", sft: str = "sft",
                  ablation: Optional[str] = "bpo_no_weakening", min_relative_drop: float = 0.40,
                  recall_slack: float = 2.0) -> list[Target]:
    """The science benchmark's targets for ``bpo`` against ``base``, ``sft`` and the ablation."""
    c = table.cells
    out: list[Target] = []
    b, p = c[base][CHAIR_I], c[bpo][CHAIR_I]
    lower = [pv < bv for pv, bv in zip(p.values, b.values)]
    out.append(Target(f"{bpo} lowers CHAIR_i below {base} on every seed", all(lower),
                      ", ".join(f"seed {s}: {bv:.1f} -> {pv:.1f}" for s, bv, pv in zip(table.seeds, b.values, p.values))))
    drop = 1 - p.mean / b.mean if b.mean else 0.0
    out.append(Target(f"{bpo} lowers mean CHAIR_i by >= {min_relative_drop:.0%} relative", drop >= min_relative_drop,
                      f"{b.mean:.2f} -> {p.mean:.2f} ({drop:+.0%} relative drop)"))
    if RECALL in c[bpo] and RECALL in c[base]:
        r_b, r_p = c[base][RECALL].mean, c[bpo][RECALL].mean
        out.append(Target(f"{bpo} keeps mean object recall >= {base} - {recall_slack:g}", r_p >= r_b - recall_slack,
                          f"{r_b:.1f} -> {r_p:.1f}"))
    if FLUENCY in c[bpo] and FLUENCY in c[base]:
        f_b, f_p = c[base][FLUENCY].mean, c[bpo][FLUENCY].mean
        out.append(Target(f"{bpo} keeps mean well-formed share >= {base}", f_p >= f_b, f"{f_b:.1f} -> {f_p:.1f}"))
    for other in (sft, ablation):
        if other and other in c:
            o = c[other][CHAIR_I]
            out.append(Target(f"{bpo} beats {other} on mean CHAIR_i", p.mean < o.mean, f"{p.mean:.2f} vs {o.mean:.2f}"))
    return out


def targets_markdown(targets: Sequence[Target]) -> str:
    return "\n".join(f"- [{'x' if t.met else ' '}] {t.claim}: {t.detail}" for t in targets)
