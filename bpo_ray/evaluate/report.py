"""Compare models: a markdown table, PNG plots and a JSON of every number (plus the config).

``write_report({"base": metrics, "bpo-both": metrics, ...}, out)`` takes what ``evaluate`` returns
per model (or ``collect_results(out)``) and writes ``report.md``, ``report.json`` and
``plots/*.png`` under ``out`` (local or s3://). Rates are shown in percent; arrows say which
direction is better; each cell also shows the change against the baseline model ("base" when
present, as the paper's Tables 3-5 compare against the base LLaVA).
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from bpo_ray import storage


@dataclass(frozen=True)
class Column:
    label: str
    get: Callable[[Mapping[str, Any]], Optional[float]]  # from metrics["benchmarks"]
    lower_is_better: bool = False


def _at(*path: str, scale: float = 1.0) -> Callable[[Mapping[str, Any]], Optional[float]]:
    def get(benchmarks: Mapping[str, Any]) -> Optional[float]:
        node: Any = benchmarks
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return float(node) * scale if isinstance(node, (int, float)) else None

    return get


HEADLINE: tuple[Column, ...] = (
    Column("CHAIR_s (Resp) ↓", _at("chair", "chair_s", scale=100), lower_is_better=True),
    Column("CHAIR_i (Obj) ↓", _at("chair", "chair_i", scale=100), lower_is_better=True),
    Column("Obj recall", _at("chair", "recall", scale=100)),
    Column("Well-formed %", _at("chair", "well_formed", scale=100)),
    Column("POPE acc", _at("pope", "mean", "accuracy", scale=100)),
    Column("POPE F1", _at("pope", "mean", "f1", scale=100)),
    Column("POPE F1 adv.", _at("pope", "adversarial", "f1", scale=100)),
    Column("POPE yes %", _at("pope", "mean", "yes_ratio", scale=100)),
    Column("POPE acc strict", _at("pope", "strict", "mean", "accuracy", scale=100)),
    Column("POPE F1 strict", _at("pope", "strict", "mean", "f1", scale=100)),
    Column("ObjHal Resp ↓", _at("objhal", "CHAIRs_refine", scale=100), lower_is_better=True),
    Column("ObjHal Ment ↓", _at("objhal", "CHAIRi", scale=100), lower_is_better=True),
    Column("AMBER CHAIR ↓", _at("amber", "generative", "CHAIR"), lower_is_better=True),
    Column("AMBER Hal ↓", _at("amber", "generative", "Hal"), lower_is_better=True),
    Column("AMBER Cover", _at("amber", "generative", "Cover")),
    Column("AMBER acc", _at("amber", "discriminative", "all", "Accuracy")),
    Column("AMBER F1", _at("amber", "discriminative", "all", "F1")),
    Column("AMBER F1 lenient", _at("amber", "discriminative_normalized", "all", "F1")),
    Column("MM-Vet", _at("mmvet", "total")),
    Column("LLaVA-Bench rel.", _at("llava_bench", "all", "relative")),
    Column("MMHal score (0-6)", _at("mmhal", "score")),
    Column("MMHal halluc. % ↓", _at("mmhal", "hallucination_rate", scale=100), lower_is_better=True),
)


def pick_baseline(results: Mapping[str, Any], baseline: Optional[str] = None) -> Optional[str]:
    if baseline is not None:
        if baseline not in results:
            raise ValueError(f"baseline {baseline!r} is not among the models {sorted(results)}")
        return baseline
    if "base" in results:
        return "base"
    return next(iter(results), None)


def _cell(value: Optional[float], base: Optional[float], show_delta: bool) -> str:
    if value is None:
        return "–"
    text = f"{value:.1f}"
    if show_delta and base is not None:
        delta = value - base
        text += f" ({'+' if delta >= 0 else '−'}{abs(delta):.1f})"
    return text


_NUMERIC_CELL = re.compile(r"^([−+-]?\d|–$)")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; columns whose cells are all numbers are right-aligned."""
    align = ["---:" if rows and all(_NUMERIC_CELL.match(row[i]) for row in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def headline_values(results: Mapping[str, Any]) -> dict[str, dict[str, Optional[float]]]:
    """model -> column label -> value, for the columns any model has."""
    columns = [c for c in HEADLINE if any(c.get(m.get("benchmarks", {})) is not None for m in results.values())]
    return {name: {c.label: c.get(m.get("benchmarks", {})) for c in columns} for name, m in results.items()}


def standard_errors(benchmarks: Mapping[str, Any]) -> dict[str, tuple[float, int]]:
    """One binomial standard error, in percent points, with its sample size: CHAIR_i over object
    mentions, POPE accuracy over every probe of every split. Returns only what the metrics allow."""
    out: dict[str, tuple[float, int]] = {}
    chair = benchmarks.get("chair") or {}
    n = chair.get("n_mentions")
    if isinstance(n, int) and n > 0 and isinstance(chair.get("chair_i"), (int, float)):
        p = float(chair["chair_i"])
        out["CHAIR_i"] = (100 * math.sqrt(p * (1 - p) / n), n)
    pope = benchmarks.get("pope") or {}
    splits = [s for k, s in pope.items() if k != "mean" and isinstance(s, Mapping) and isinstance(s.get("n"), int)]
    n = sum(s["n"] for s in splits)
    if n > 0:
        a = sum(s["accuracy"] * s["n"] for s in splits) / n
        out["POPE acc"] = (100 * math.sqrt(a * (1 - a) / n), n)
    return out


def _noise_note(results: Mapping[str, Any], base_name: Optional[str]) -> list[str]:
    if not base_name:
        return []
    errors = standard_errors(results[base_name].get("benchmarks", {}))
    if not errors:
        return []
    units = {"CHAIR_i": "object mentions", "POPE acc": "probes"}
    parts = ", ".join(f"{k} ±{se:.1f} ({n} {units[k]})" for k, (se, n) in errors.items())
    return [f"One binomial standard error of **{base_name}**: {parts}. A change smaller than about twice "
            "that is within sampling noise.", ""]


def markdown_report(results: Mapping[str, Any], baseline: Optional[str] = None, title: str = "Evaluation",
                    plots: tuple[str, ...] = ()) -> str:
    base_name = pick_baseline(results, baseline)
    values = headline_values(results)
    labels = list(next(iter(values.values())).keys()) if values else []
    parts = [f"# {title}", ""]
    if base_name:
        parts += [f"Numbers in percent (MM-Vet: 0-100 grade, LLaVA-Bench: relative score, MMHal score: mean "
                  f"0-6 rating). In brackets: change "
                  f"against **{base_name}**. ↓ lower is better.", ""]
    parts += ["Seeds behind each number: 1 (one run of each model; a model-quality claim needs the "
              "multi-seed table of `bench/science.py`, mean ± sd over seeds).", ""]
    rows = [[name] + [_cell(values[name][label], values[base_name][label] if base_name else None,
                            name != base_name) for label in labels] for name in results]
    parts += ["## Main results", "", _table(["Model"] + labels, rows), ""]
    parts += _noise_note(results, base_name)

    pope_rows = []
    for name, m in results.items():
        pope = m.get("benchmarks", {}).get("pope") or {}
        for parse, by_split in (("official", pope), ("strict", pope.get("strict") or {})):
            for split in ("random", "popular", "adversarial"):
                s = by_split.get(split)
                if s:
                    pope_rows.append([name, split, parse] + [f"{100 * s[k]:.1f}" for k in (
                        "accuracy", "precision", "recall", "f1", "yes_ratio")] + [str(s["n"])])
    if pope_rows:
        parts += ["## POPE by split", "", "Parse *official*: RUCAIBox/POPE evaluate.py's rule (first sentence; "
                  "\"no\" only for the word No/no/not). *strict*: bpo-ray's parse (first yes/no word, then "
                  "negations; neither counts \"no\").", "",
                  _table(["Model", "Split", "Parse", "Acc", "Prec", "Rec", "F1", "Yes %", "n"], pope_rows), ""]

    caps = _union_keys(results, "mmvet", "per_capability")
    if caps:
        rows = [[name] + [_fmt(m["benchmarks"].get("mmvet", {}).get("per_capability", {}).get(c)) for c in caps]
                + [_fmt(m["benchmarks"].get("mmvet", {}).get("total"))] for name, m in results.items()]
        parts += ["## MM-Vet by capability", "", _table(["Model"] + caps + ["Total"], rows), ""]

    cats = _union_keys(results, "llava_bench", "per_category")
    if cats:
        rows = [[name] + [_fmt((m["benchmarks"].get("llava_bench", {}).get("per_category", {}).get(c) or {}).get("relative"))
                          for c in cats] + [_fmt((m["benchmarks"].get("llava_bench", {}).get("all") or {}).get("relative"))]
                for name, m in results.items()]
        parts += ["## LLaVA-Bench relative score by category", "", _table(["Model"] + cats + ["All"], rows), ""]

    types = _union_keys(results, "mmhal", "per_type")
    if types:
        rows = []
        for name, m in results.items():
            per_type = m["benchmarks"].get("mmhal", {}).get("per_type", {})
            rows.append([name] + [_mmhal_cell(per_type.get(t)) for t in types] + [_mmhal_cell(m["benchmarks"].get("mmhal"))])
        parts += ["## MMHal-Bench by question type", "", "Mean rating 0-6 / hallucination rate (share of ratings "
                  "below 3) in percent.", "", _table(["Model"] + types + ["All"], rows), ""]

    usage_rows = []
    for name, m in results.items():
        run = (m.get("judge_usage") or {}).get("run")
        if run:
            usage_rows.append([name] + [str(run.get(k, 0)) for k in (
                "requests", "cache_hits", "upstream_requests", "errors", "prompt_tokens", "completion_tokens")]
                + [f"{run.get('cost_usd', 0.0):.4f}", f"{run.get('saved_usd', 0.0):.4f}"])
    if usage_rows:
        judge = next((m.get("judge_model") for m in results.values() if m.get("judge_usage")), None)
        parts += ["## Judge proxy", "", f"What each model's evaluation asked of the judge proxy (judge model "
                  f"`{judge}`), from its `/usage` counters before and after the run; cost at the proxy's prices "
                  "(`serve.judge.price_per_1k_*`), saved = what the cache hits would have cost.", "",
                  _table(["Model", "Requests", "Cache hits", "Upstream", "Errors", "Prompt tok.", "Completion tok.",
                          "Cost $", "Saved $"], usage_rows), ""]

    count_rows = []
    for name, m in results.items():
        for bench, c in m.get("counts", {}).items():
            reasons = ", ".join(f"{k}: {v}" for k, v in m.get("failures", {}).get(bench, {}).items()) or "–"
            count_rows.append([name, bench, str(c.get("items", 0)), str(c.get("scored", 0)), str(c.get("failed", 0)), reasons])
    if count_rows:
        parts += ["## Items scored and failures", "", _table(["Model", "Benchmark", "Items", "Scored", "Failed", "Reasons"], count_rows), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.rsplit('/', 1)[-1][:-4]}]({p})" for p in plots] + [""]
    parts += ["Every number, and the config that produced it, is in `report.json`; per-item answers in "
              "`<model>/items.jsonl`.", ""]
    return "\n".join(parts)


def _mmhal_cell(stats: Optional[Mapping[str, Any]]) -> str:
    if not stats or not isinstance(stats.get("score"), (int, float)):
        return "–"
    return f"{stats['score']:.2f} / {100 * stats['hallucination_rate']:.0f}"


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


def _union_keys(results: Mapping[str, Any], bench: str, key: str) -> list[str]:
    keys: list[str] = []
    for m in results.values():
        for k in (m.get("benchmarks", {}).get(bench) or {}).get(key, {}) or {}:
            if k not in keys:
                keys.append(k)
    return keys


# ---------------------------------------------------------------------------------------------
# Plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grouped_bars(ax, groups: list[str], series: dict[str, list[Optional[float]]], ylabel: str) -> None:
    import numpy as np

    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    top = 1.0
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name, color=f"C{i}")
        top = max([top] + [v for v in values if v is not None])
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_pngs(results: Mapping[str, Any]) -> dict[str, bytes]:
    """``{"plots/headline.png": bytes, ...}``; one figure per table that has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}
    values = headline_values(results)
    labels = list(next(iter(values.values())).keys()) if values else []
    models = list(results)
    if labels:
        cols = min(3, len(labels))
        rows = (len(labels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, label in zip(axes.flat, labels):
            heights = [0.0 if values[m][label] is None else values[m][label] for m in models]
            bars = ax.bar(range(len(models)), heights, color=[f"C{i}" for i in range(len(models))])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
            ax.set_ylim(0, max(1.0, max(heights)) * 1.18)
            ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
            ax.set_title(label, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(labels):]:
            ax.axis("off")
        fig.tight_layout()
        pngs["plots/headline.png"] = _png(fig)

    splits = [s for s in ("random", "popular", "adversarial")
              if any((m.get("benchmarks", {}).get("pope") or {}).get(s) for m in results.values())]
    if splits:
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        series = {name: [((m["benchmarks"].get("pope") or {}).get(s) or {}).get("f1") for s in splits] for name, m in results.items()}
        _grouped_bars(ax, splits, {k: [None if v is None else 100 * v for v in vs] for k, vs in series.items()}, "POPE F1 (%)")
        ax.legend(fontsize=8)
        pngs["plots/pope_f1.png"] = _png(fig)

    for bench, key, getter, ylabel, name in (
        ("mmvet", "per_capability", lambda v: v, "MM-Vet grade (0-100)", "plots/mmvet.png"),
        ("llava_bench", "per_category", lambda v: (v or {}).get("relative"), "LLaVA-Bench relative (%)", "plots/llava_bench.png"),
        ("mmhal", "per_type", lambda v: (v or {}).get("score"), "MMHal-Bench rating (0-6)", "plots/mmhal.png"),
    ):
        groups = _union_keys(results, bench, key)
        if groups:
            fig, ax = plt.subplots(figsize=(6.5, 3.5))
            series = {m_name: [getter(((m["benchmarks"].get(bench) or {}).get(key) or {}).get(g)) for g in groups]
                      for m_name, m in results.items()}
            _grouped_bars(ax, groups, series, ylabel)
            ax.legend(fontsize=8)
            pngs[name] = _png(fig)
    return pngs


# ---------------------------------------------------------------------------------------------


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out: str,
    config: Optional[Mapping[str, Any]] = None,
    baseline: Optional[str] = None,
    title: str = "BPO evaluation",
) -> dict[str, str]:
    """Write report.md, report.json and plots/*.png under ``out``; returns name -> URI written.

    ``results`` maps model name -> the dict ``evaluate`` returned for it; ``config`` (e.g. the
    whole ``BPOConfig`` dumped) is stored beside the numbers in report.json.
    """
    if not results:
        raise ValueError("no results to report")
    written: dict[str, str] = {}
    base_name = pick_baseline(results, baseline)
    document = {
        "title": title,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "baseline": base_name,
        "headline": headline_values(results),
        "models": results,
        "config": config,
    }
    pngs = plot_pngs(results)
    for name, data in (("report.json", json.dumps(document, indent=2, default=str).encode()),
                       ("report.md", markdown_report(results, base_name, title, tuple(pngs)).encode()),
                       *pngs.items()):
        uri = storage.join(out, name)
        storage.write_bytes(uri, data)
        written[name] = uri
    return written
