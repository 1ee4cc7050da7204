"""The ``bpo-ray`` entry point: usage, unknown commands, and stage dispatch."""

import subprocess
import sys

from bpo_ray.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_a_clear_error(capsys):
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_jobs_entrypoint_runs_the_same_code(tmp_path):
    """``python jobs/models.py`` (the ray job submit target) builds what ``bpo-ray models`` builds."""
    res = subprocess.run([sys.executable, "jobs/models.py", "tiny", "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m" / "llava" / "config.json").exists()
    assert (tmp_path / "m" / "text_lm" / "tokenizer.json").exists()


def test_early_numerics_pass_is_not_fooled_by_a_stage_flag_that_prefixes_its_own(capsys, monkeypatch):
    """``evaluate --add`` starts like ``--address``: the early pass must not read it as one (argparse
    abbreviations), print a usage error, or skip pinning the kernels."""
    from bpo_ray import cli, numerics

    pinned = []
    monkeypatch.setattr(numerics, "pin", lambda isa: pinned.append(isa))
    cli.pin_numerics_early(["--config", "tiny", "--model", "m", "--add", "--out", "x"])
    assert pinned and capsys.readouterr().err == ""
