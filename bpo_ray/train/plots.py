"""PNG of the policy's chosen/rejected log-probs over training (like BPO paper Figure 6)."""

from __future__ import annotations

import io
import json
from typing import Iterable

from bpo_ray import storage


def read_metrics(uri: str) -> list[dict]:
    """Step records of ``metrics.jsonl``; when a resumed run logged a step again, the last wins."""
    by_step: dict[int, dict] = {}
    for line in storage.read_text(uri).splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "step" in record and "event" not in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_logps(records: Iterable[dict], out_uri: str, title: str = "") -> None:
    """Chosen and rejected answer log-probs (policy, and reference when logged) against step,
    with the reward margin and accuracy underneath; SFT runs show the chosen log-prob and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r.get("chosen_logp") for r in records], label="chosen (policy)", color="tab:green")
    if records and "rejected_logp" in records[0]:
        top.plot(steps, [r["rejected_logp"] for r in records], label="rejected (policy)", color="tab:red")
        top.plot(steps, [r["ref_chosen_logp"] for r in records], "--", label="chosen (reference)", color="tab:green", alpha=0.5)
        top.plot(steps, [r["ref_rejected_logp"] for r in records], "--", label="rejected (reference)", color="tab:red", alpha=0.5)
        bottom.plot(steps, [r["reward_margin"] for r in records], label="reward margin", color="tab:blue")
        acc = bottom.twinx()
        acc.plot(steps, [r["reward_accuracy"] for r in records], label="reward accuracy", color="tab:orange")
        acc.set_ylim(-0.05, 1.05)
        acc.set_ylabel("reward accuracy")
        bottom.set_ylabel("reward margin")
        handles = bottom.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
        bottom.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    else:
        bottom.plot(steps, [r["loss"] for r in records], label="SFT loss", color="tab:blue")
        bottom.set_ylabel("loss")
        bottom.legend(loc="best", fontsize=8)
    top.set_ylabel("answer log-prob")
    top.legend(loc="best", fontsize=8)
    top.set_title(title or "log-probabilities of chosen and rejected answers during training")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(out_uri, buf.getvalue())
