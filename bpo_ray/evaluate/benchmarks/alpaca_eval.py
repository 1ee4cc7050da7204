"""AlpacaEval-style pairwise win rate against a reference output file (Li et al. 2024's Table 2).

Li et al., "AlpacaEval: An Automatic Evaluator of Instruction-following Models", 2023. Kept from
the protocol: the input is a reference file in AlpacaEval's format (a JSON list of
``{"instruction", "output", "generator", "dataset"}``, e.g. ``alpaca_eval.json`` with the
reference model's outputs); the model answers every instruction; the judge sees the instruction and
the two outputs in a seeded random order and names the better one; the win rate is the share of
instructions where the model's output is preferred, times 100 (a tie counts one half). The prompt
is ours, so numbers are not comparable with the AlpacaEval leaderboard (which also uses
length-controlled win rates; not done here).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from bpo_ray.evaluate.sources import read_json
from bpo_ray.evaluate.items import SkipTally

NAME = "alpaca_eval"

PAIRWISE_TEMPLATE = """You compare two outputs of AI assistants for the same instruction and decide which one follows it better: correct, helpful, relevant and clear. The order of the outputs says nothing about their quality, and neither does their length.

## Instruction
{instruction}

## Output (a)
{output_a}

## Output (b)
{output_b}

## Verdict
Answer with exactly one of: "Output (a)", "Output (b)" or "Tie"."""


@dataclass(frozen=True)
class ReferenceItem:
    index: int
    instruction: str
    output: str
    generator: str = ""
    dataset: str = ""


@dataclass
class LoadedReference(SkipTally):
    items: list[ReferenceItem] = field(default_factory=list)


def load_reference(uri: str, max_items: Optional[int] = None) -> LoadedReference:
    """The reference outputs (local path or ``s3://``); unusable records are skipped and counted
    (``not_an_object``, ``missing_instruction``, ``missing_output``)."""
    data = read_json(uri)
    if not isinstance(data, list):
        raise ValueError(f"{uri}: an AlpacaEval reference file is a JSON list of records")
    loaded = LoadedReference()
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            loaded.skip("not_an_object")
            continue
        instruction, output = record.get("instruction"), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            loaded.skip("missing_instruction")
            continue
        if not isinstance(output, str):
            loaded.skip("missing_output")
            continue
        loaded.items.append(ReferenceItem(i, instruction, output, str(record.get("generator") or ""),
                                          str(record.get("dataset") or "")))
        if max_items and len(loaded.items) >= max_items:
            break
    return loaded


def model_first(seed: int, index: int) -> bool:
    """Whether the model's output is shown as (a) for item ``index`` (seeded, half the time)."""
    return random.Random(f"alpaca-eval-order:{seed}:{index}").random() < 0.5


def judge_prompt(instruction: str, model_output: str, reference_output: str, first: bool) -> str:
    a, b = (model_output, reference_output) if first else (reference_output, model_output)
    return PAIRWISE_TEMPLATE.format(instruction=instruction, output_a=a, output_b=b)


_VERDICT = re.compile(r"\bOutput \((a|b)\)|\b(Tie)\b", re.I)


def parse_verdict(text: str) -> Optional[str]:
    """``"a"``, ``"b"`` or ``"tie"`` from the judge's reply (its last verdict phrase), else ``None``."""
    found = _VERDICT.findall(text or "")
    if not found:
        return None
    letter, tie = found[-1]
    return "tie" if tie else letter.lower()


def model_preference(verdict: str, first: bool) -> float:
    """1 if the model's output won, 0 if it lost, 0.5 on a tie."""
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "a") == first else 0.0


def score(preferences: Sequence[Optional[float]]) -> dict[str, Any]:
    """Win rate (x100) over the judged items; unparsed verdicts (``None``) are counted, not scored."""
    judged = [p for p in preferences if p is not None]
    return {"win_rate": 100.0 * sum(judged) / len(judged) if judged else 0.0, "n": len(preferences),
            "n_judged": len(judged), "wins": sum(p == 1.0 for p in judged), "ties": sum(p == 0.5 for p in judged),
            "losses": sum(p == 0.0 for p in judged), "n_unparsed": len(preferences) - len(judged)}
