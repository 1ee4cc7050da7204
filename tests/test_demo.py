"""``bpo-ray demo``: its job runner (``python -m bpo_ray <stage>`` as a Ray job) and ``--reuse``
(finished stages are kept, other settings are refused)."""

import json

import pytest

from bpo_ray.demo import (OWN_PAIRS, SETTINGS_FILE, VARIANTS, DemoError, _check_reuse, demo_benchmarks, demo_settings,
                          run_demo, still_to_evaluate)
from bpo_ray.localcluster import LocalCluster, submit_and_wait
from test_config import OLD_DEMO_OVERRIDES


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

    return load_config("demo", list(overrides)).evaluate


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
    summary = run_demo(tmp_path, "demo", ["world.seed=3"], num_cpus=1, reuse=True)
    stages = {k: v for k, v in summary["timings_s"].items() if k != "total"}
    assert stages and all(v == 0.0 for v in stages.values()), stages  # no earlier summary: nothing timed
    # an earlier summary's stage times are kept for the reused stages
    (tmp_path / "demo_summary.json").write_text(json.dumps({"timings_s": {"generate pairs": 100.0, "train sft": 40.0}}))
    summary = run_demo(tmp_path, "demo", ["world.seed=3"], num_cpus=1, reuse=True)
    assert summary["timings_s"]["generate pairs"] == 100.0 and summary["timings_s"]["total"] == 140.0
    out = capsys.readouterr().out
    assert "reused" in out and "WARNING --reuse" in out  # no settings recorded before
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert settings["config"] == "demo" and "world.seed=3" in settings["overrides"]


def test_reuse_with_other_settings_is_refused(tmp_path):
    _finished_run(tmp_path)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"config": "tiny", "overrides": ["world.seed=1"]}))
    with pytest.raises(DemoError, match="other settings"):
        run_demo(tmp_path, "tiny", ["world.seed=2"], num_cpus=1, reuse=True)
    # nothing was overwritten: the recorded settings are still the earlier run's
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["overrides"] == ["world.seed=1"]


def _recorded(out, settings):
    _finished_run(out)
    (out / SETTINGS_FILE).write_text(json.dumps(settings))


def test_reuse_compares_the_resolved_config_not_its_spelling(tmp_path):
    """``--reuse`` accepts an earlier run whose settings resolve to the same config, however they
    were spelled (a run from before configs/demo.yaml recorded the demo's settings as overrides on
    tiny), and refuses one where a resolved value changed, naming it."""
    _recorded(tmp_path, {"config": "tiny", "overrides": [*OLD_DEMO_OVERRIDES, "world.seed=3"]})  # the old format
    _check_reuse(tmp_path, demo_settings("demo", ["world.seed=3"]))
    _recorded(tmp_path, demo_settings("demo", ["train.epochs=1"]))  # the demo's own value, spelled out
    _check_reuse(tmp_path, demo_settings("demo", []))
    with pytest.raises(DemoError, match=r"other settings .*train\.epochs: 1(\.0)? -> 2"):
        _check_reuse(tmp_path, demo_settings("demo", ["train.epochs=2"]))
    with pytest.raises(DemoError, match=r"world\.train_partner_rate: 0\.9 -> 0\.5"):  # a changed demo.yaml value
        _check_reuse(tmp_path, demo_settings("demo", ["world.train_partner_rate=0.5"]))
    with pytest.raises(DemoError, match=r"world\.train_partner_rate: 0\.9 -> 0\.0"):  # the demo's settings dropped
        _check_reuse(tmp_path, demo_settings("tiny", []))
    # evaluate settings are compared per model and benchmark (still_to_evaluate), not here
    _check_reuse(tmp_path, demo_settings("demo", ["evaluate.pope.n_per_image=2"]))
    # a setting the code gained (or lost) since the run is no changed value
    older = demo_settings("demo", [])
    del older["resolved"]["train"]["beta"]
    older["resolved"]["train"]["retired_knob"] = 1
    _recorded(tmp_path, older)
    _check_reuse(tmp_path, demo_settings("demo", []))


def test_demo_cli_takes_the_demo_config_and_refuses_a_bad_override(tmp_path, capsys):
    from bpo_ray.demo import build_parser, main

    args = build_parser().parse_args([])
    assert (args.config, args.out, args.overrides) == ("demo", "runs/demo", [])
    assert main(["--out", str(tmp_path / "run"), "--set", "train.betta=1"]) == 2  # before any cluster starts
    assert "unknown key 'train.betta'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stages_run_as_ray_jobs_through_python_m_bpo_ray(capsys):
    with LocalCluster(num_cpus=1) as cluster:
        submit_and_wait(cluster.dashboard_url, "envcheck", ["--quick"])
        with pytest.raises(RuntimeError, match="FAILED") as failed:
            submit_and_wait(cluster.dashboard_url, "models", ["no-such-model"], echo=False)
        assert "no-such-model" in str(failed.value)  # the log tail names the problem
