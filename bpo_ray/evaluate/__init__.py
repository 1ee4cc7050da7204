"""The evaluate stage: benchmark items -> served model -> judge proxy -> scores -> report.

``evaluate(cfg, model_url, model_name, judge_url, out)`` runs one model and returns its metrics;
``write_report(results, out)`` compares several. ``bpo-ray evaluate`` (``cli.py``) does both.
"""

from bpo_ray.evaluate.pipeline import EvaluateError, collect_results, evaluate
from bpo_ray.evaluate.report import write_report

__all__ = ["evaluate", "write_report", "collect_results", "EvaluateError"]
