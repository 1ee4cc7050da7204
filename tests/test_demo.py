"""``bpo-ray demo``: its job runner (``python -m bpo_ray <stage>`` as a Ray job) and ``--reuse``
(finished stages are kept, other settings are refused)."""

import json

import pytest

from bpo_ray.demo import OWN_PAIRS, SETTINGS_FILE, VARIANTS, DemoError, demo_benchmarks, run_demo, still_to_evaluate
from bpo_ray.localcluster import LocalCluster, submit_and_wait


def _finished_run(out):
    """The files a finished demo leaves behind, one per stage."""
    done = [out / "models" / "base_model.json", out / "generate" / "manifest.json",
            out / "reference" / "manifest.json",
            *[out / folder / "manifest.json" for folder in OWN_PAIRS.values()],
            *[out / "train" / v / "manifest.json" for v in VARIANTS]]
    for path in done:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    for model in ["base", *VARIANTS]:
        metrics = out / "eval" / model / "metrics.json"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps({"benchmarks": {b: {} for b in demo_benchmarks()},
                                       "config": _demo_evaluate_config().model_dump(mode="json")}))


def _demo_evaluate_config(*overrides: str):
    from bpo_ray.config import load_config
    from bpo_ray.demo import DEMO_OVERRIDES

    return load_config("tiny", [*DEMO_OVERRIDES, *overrides]).evaluate


def test_only_missing_or_changed_benchmarks_are_evaluated_again(tmp_path):
    ecfg = _demo_evaluate_config()
    metrics = tmp_path / "metrics.json"
    assert still_to_evaluate(metrics, ecfg) == demo_benchmarks()  # nothing evaluated yet
    recorded = ecfg.model_dump(mode="json")
    metrics.write_text(json.dumps({"benchmarks": {"chair": {}, "pope": {}}, "config": recorded}))
    assert still_to_evaluate(metrics, ecfg) == [b for b in demo_benchmarks() if b not in ("chair", "pope")]
    metrics.write_text(json.dumps({"benchmarks": {b: {} for b in demo_benchmarks()}, "config": recorded}))
    assert still_to_evaluate(metrics, ecfg) == []
    # another POPE setting re-evaluates POPE only; another shared setting re-evaluates everything
    assert still_to_evaluate(metrics, _demo_evaluate_config("evaluate.pope.n_per_image=2")) == ["pope"]
    assert still_to_evaluate(metrics, _demo_evaluate_config("evaluate.max_tokens=80")) == demo_benchmarks()


def test_reuse_of_a_finished_run_submits_nothing(tmp_path, capsys):
    _finished_run(tmp_path)
    summary = run_demo(tmp_path, "tiny", ["world.seed=3"], num_cpus=1, reuse=True)
    stages = {k: v for k, v in summary["timings_s"].items() if k != "total"}
    assert stages and all(v == 0.0 for v in stages.values()), stages  # no earlier summary: nothing timed
    # an earlier summary's stage times are kept for the reused stages
    (tmp_path / "demo_summary.json").write_text(json.dumps({"timings_s": {"generate pairs": 100.0, "train sft": 40.0}}))
    summary = run_demo(tmp_path, "tiny", ["world.seed=3"], num_cpus=1, reuse=True)
    assert summary["timings_s"]["generate pairs"] == 100.0 and summary["timings_s"]["total"] == 140.0
    out = capsys.readouterr().out
    assert "reused" in out and "WARNING --reuse" in out  # no settings recorded before
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert settings["config"] == "tiny" and "world.seed=3" in settings["overrides"]


def test_reuse_with_other_settings_is_refused(tmp_path):
    _finished_run(tmp_path)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"config": "tiny", "overrides": ["world.seed=1"]}))
    with pytest.raises(DemoError, match="other settings"):
        run_demo(tmp_path, "tiny", ["world.seed=2"], num_cpus=1, reuse=True)
    # nothing was overwritten: the recorded settings are still the earlier run's
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["overrides"] == ["world.seed=1"]


def test_stages_run_as_ray_jobs_through_python_m_bpo_ray(capsys):
    with LocalCluster(num_cpus=1) as cluster:
        submit_and_wait(cluster.dashboard_url, "envcheck", ["--quick"])
        with pytest.raises(RuntimeError, match="FAILED") as failed:
            submit_and_wait(cluster.dashboard_url, "models", ["no-such-model"], echo=False)
        assert "no-such-model" in str(failed.value)  # the log tail names the problem
