"""The package works installed as a wheel, away from the checkout: the named configs and the
DeepSpeed JSONs ship inside it, and ``python -m bpo_ray`` / ``bpo-ray`` run from any directory."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable wheel of the checkout, installed into a fresh target directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel, = (tmp / "dist").glob("bpo_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bpo_ray/configs/tiny.yaml" in names and "bpo_ray/train/deepspeed/zero3.json" in names
    assert "bpo_ray/configs/demo.yaml" in names
    target = tmp / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-2000:]
    away = tmp / "elsewhere"
    away.mkdir()
    # PYTHONPATH puts the installed copy first; the venv supplies the dependencies.
    env = {**os.environ, "PYTHONPATH": str(target)}
    return target, away, env


def _run(args, installed, timeout=600):
    target, away, env = installed
    return subprocess.run(args, cwd=away, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_copy_is_the_one_imported(installed):
    target, _, _ = installed
    res = _run([sys.executable, "-c", "import bpo_ray, json; print(json.dumps(bpo_ray.__file__))"], installed)
    assert res.returncode == 0, res.stderr
    assert Path(json.loads(res.stdout)).is_relative_to(target)


def test_envcheck_and_tiny_models_run_from_outside_the_checkout(installed):
    target, away, _ = installed
    res = _run([sys.executable, "-m", "bpo_ray", "envcheck", "--quick"], installed)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run([str(target / "bin" / "bpo-ray"), "models", "tiny", "--out", str(away / "models")], installed)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (away / "models" / "llava" / "config.json").exists()


def test_named_configs_and_deepspeed_json_come_from_the_package(installed):
    target, _, _ = installed
    code = ("from bpo_ray.config import load_config, resolve_config_path\n"
            "from bpo_ray.config.train import TrainConfig\n"
            "from bpo_ray.train.zero import load_deepspeed_template\n"
            "import json\n"
            "print(json.dumps([resolve_config_path('tiny'), resolve_config_path('llava-1.5-7b'),\n"
            "                  resolve_config_path('demo'), load_config('llava-1.5-7b').name,\n"
            "                  [load_config('demo').name, load_config('demo').train.epochs],\n"
            "                  load_deepspeed_template(TrainConfig(zero_stage=3))['zero_optimization']['stage']]))")
    res = _run([sys.executable, "-c", code], installed)
    assert res.returncode == 0, res.stderr[-2000:]
    tiny, llava, demo, name, demo_cfg, stage = json.loads(res.stdout)
    assert all(Path(p).is_relative_to(target) for p in (tiny, llava, demo))
    assert name == "llava-1.5-7b" and stage == 3
    assert demo_cfg == ["tiny", 1]  # demo.yaml's own value over its base's (tiny, from the package too)
