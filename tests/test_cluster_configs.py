"""The cluster configs in cluster/: checked with Ray's own tools and against the project's pins.

- ``cluster/runtime_env.yaml``: parsed by Ray's ``RuntimeEnv``; its excludes, applied by Ray's
  own packager, keep the upload to the code (no virtualenv, run outputs or git history).
- ``cluster/aws.yaml``: Ray's cluster-config JSON schema and ``validate_config`` after the
  launcher's own ``prepare_config``; node types consistent with the GPU config's requests.
- ``cluster/node_secrets.py``: against a real SSM endpoint on loopback (moto).
- ``cluster/kuberay/``: structure, versions and entrypoints, as far as offline tools allow (no
  kubectl, no CRD schema in this repo).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
BATCH_STAGES = ("generate", "reference", "train", "evaluate")

# GPUs per instance for the types a config may name (AWS instance type specs).
GPUS_PER_INSTANCE = {
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.12xlarge": 4, "g6e.xlarge": 1, "g6e.12xlarge": 4,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
}
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                        # AWS access key id
    re.compile(r"sk-[A-Za-z0-9_-]{16,}"),                   # OpenAI-style key
    re.compile(r"hf_[A-Za-z0-9]{20,}"),                     # Hugging Face token
    re.compile(r"(?i)(secret_access_key|api_key|token|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+_-]{12,}"),
]


def _pyproject_versions() -> tuple[str, str]:
    """(project version, exact ray pin) from pyproject.toml."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_pin = next(re.search(r"==([0-9.]+)", d).group(1) for d in data["project"]["dependencies"]
                   if d.startswith("ray["))
    return data["project"]["version"], ray_pin


def _assert_no_secrets(path: Path) -> None:
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        hit = pattern.search(text)
        assert hit is None, f"{path.name} looks like it holds a secret: {hit.group(0)[:12]}..."


def _llava_config():
    from bpo_ray.config import load_config

    return load_config("llava-1.5-7b")


# ---------------------------------------------------------------------------------------------
# runtime env


def _runtime_env() -> dict:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def test_runtime_env_is_valid_for_ray_and_holds_no_secret():
    from ray.runtime_env import RuntimeEnv

    data = _runtime_env()
    env = RuntimeEnv(**data)  # Ray's own validation of every field
    assert env.get("env_vars") == data["env_vars"]
    assert "working_dir" not in data, "the working dir comes from `--working-dir .`"
    for name in data["env_vars"]:
        assert not re.search(r"(_KEY|SECRET|_TOKEN|PASSWORD)(_|$)", name), f"secret-like env var {name}"
    _assert_no_secrets(CLUSTER / "runtime_env.yaml")


def test_runtime_env_excludes_keep_the_upload_to_the_code(tmp_path):
    """Ray's own packager, with .gitignore ignored, so the excludes alone must do the work."""
    from ray._private.runtime_env.packaging import create_package

    pkg = tmp_path / "working_dir.zip"
    create_package(str(REPO), pkg, include_gitignore=False, excludes=_runtime_env()["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    for forbidden in (".venv/", "runs/", ".git/", ".pytest_cache/"):
        assert not any(n.startswith(forbidden) for n in names), f"{forbidden} would be uploaded"
    assert not any("__pycache__" in n for n in names)
    for needed in ("jobs/_entry.py", "jobs/train.py", "bpo_ray/cli.py", "bpo_ray/configs/tiny.yaml", "bpo_ray/train/deepspeed/zero2.json",
                   "cluster/runtime_env.yaml"):
        assert needed in names, f"{needed} missing from the working-dir upload"
    assert pkg.stat().st_size < 20 * 1024 * 1024, "working-dir upload unexpectedly large"


# ---------------------------------------------------------------------------------------------
# AWS cluster launcher config


@pytest.fixture(scope="module")
def aws_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_config_passes_rays_schema_and_validate_config(aws_config):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws_config, schema)  # the file as written
    prepared = prepare_config(copy.deepcopy(aws_config))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == set(aws_config["available_node_types"])


def test_aws_schema_check_is_not_vacuous(aws_config):
    """A misspelt field and a fractional resource must fail the same validation."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(aws_config)
    bad["available_node_types"]["gpu_generate"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(aws_config)
    bad["available_node_types"]["gpu_generate"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_aws_node_types_are_consistent(aws_config):
    types = aws_config["available_node_types"]
    head = types[aws_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must be a CPU node"
    assert head["resources"].get("CPU", 0) == 0, "no task or actor should land on the head"
    assert head["node_config"]["InstanceType"].split(".")[0][0] not in "gp", "head on a GPU instance"
    workers = {name: t for name, t in types.items() if name != aws_config["head_node_type"]}
    assert {"cpu_worker", "gpu_generate", "gpu_train", "gpu_serve"} <= set(workers)
    for name, t in workers.items():
        res = t["resources"]
        assert res.get("CPU", 0) > 0, f"{name}: no CPU advertised"
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], f"{name}: min_workers > max_workers"
        itype = t["node_config"]["InstanceType"]
        if res.get("GPU", 0):
            assert GPUS_PER_INSTANCE[itype] == res["GPU"], f"{name}: {itype} has {GPUS_PER_INSTANCE[itype]} GPUs"
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: no instance profile (S3 access)"
    assert sum(t["max_workers"] for t in workers.values()) <= aws_config["max_workers"]
    spot = {n for n, t in workers.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    assert {"gpu_generate", "cpu_worker"} <= spot, "re-runnable work should use spot"
    assert "gpu_serve" not in spot, "serving replicas must not be reclaimed mid-request"
    assert workers["gpu_train"]["resources"]["GPU"] >= 4, "training nodes are multi-GPU"


def test_aws_node_types_fit_the_gpu_config(aws_config):
    """Every actor/worker the GPU config asks for fits a worker type, and the maxima line up."""
    cfg = _llava_config()
    workers = [t for n, t in aws_config["available_node_types"].items() if n != aws_config["head_node_type"]]

    def fits(cpus: float, gpus: float) -> bool:
        return any(t["resources"].get("CPU", 0) >= cpus and t["resources"].get("GPU", 0) >= gpus for t in workers)

    for pool in (cfg.generate.sampler.pool, cfg.generate.injector.pool):
        assert fits(pool.num_cpus, pool.num_gpus), f"no node type fits a generate actor {pool}"
    gen_gpus = aws_config["available_node_types"]["gpu_generate"]
    assert gen_gpus["max_workers"] * gen_gpus["resources"]["GPU"] >= cfg.generate.sampler.pool.max_size
    assert fits(cfg.serve.model.num_cpus, cfg.serve.model.num_gpus)
    serve = aws_config["available_node_types"]["gpu_serve"]
    assert serve["max_workers"] * serve["resources"]["GPU"] >= cfg.serve.model.autoscaling.max_replicas
    train = aws_config["available_node_types"]["gpu_train"]
    max_train_workers = max(cfg.train.num_workers) if isinstance(cfg.train.num_workers, tuple) else cfg.train.num_workers
    assert train["max_workers"] * train["resources"]["GPU"] >= max_train_workers


def test_aws_setup_installs_the_pinned_stack_and_holds_no_secret(aws_config):
    _, ray_pin = _pyproject_versions()
    for remote, local in aws_config["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts source {local} does not exist"
    code_dir = next(remote for remote, local in aws_config["file_mounts"].items() if (REPO / local).resolve() == REPO)
    setup = aws_config["setup_commands"]
    assert f"pip install -q -r {code_dir}/requirements/gpu.txt" in setup, "setup does not install requirements/gpu.txt"
    assert any(c.startswith("python " + f"{code_dir}/cluster/node_secrets.py") for c in setup)
    assert {".venv", "runs", ".git"} <= set(aws_config["rsync_exclude"]), "sync must skip venv, outputs, git"
    assert f"ray[train,data,serve]=={ray_pin}" in (REPO / "requirements/gpu.txt").read_text()
    for key in ("head_image", "worker_image"):
        image = aws_config["docker"][key]
        assert image.startswith(f"rayproject/ray:{ray_pin}-py311"), f"{key} {image} != ray {ray_pin}"
    assert aws_config["docker"]["worker_image"].endswith(("-cu128", "-cu124", "-gpu")), "GPU workers need a CUDA image"
    for cmds in (aws_config["head_start_ray_commands"], aws_config["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("~/.bpo-ray.env" in c for c in start), "start commands must load the secrets"
    _assert_no_secrets(CLUSTER / "aws.yaml")


# ---------------------------------------------------------------------------------------------
# node secrets: SSM -> env file, against a real SSM endpoint (moto) on loopback


def test_node_secrets_writes_a_private_env_file_from_ssm(s3_server, tmp_path):
    import boto3

    node_secrets = _load_node_secrets()
    ssm = boto3.client("ssm", endpoint_url=s3_server["endpoint"], region_name="us-east-1")
    tricky = "sk-test 'quoted' $HOME `x` \"dq\""
    ssm.put_parameter(Name="/bpo-test/OPENAI_API_KEY", Value=tricky, Type="SecureString", Overwrite=True)
    ssm.put_parameter(Name="/bpo-test/HF_TOKEN", Value="hf_plain", Type="SecureString", Overwrite=True)
    out = tmp_path / "home" / ".bpo-ray.env"
    rc = node_secrets.main(["--prefix", "/bpo-test/", "--region", "us-east-1", "--endpoint-url",
                            s3_server["endpoint"], "--out", str(out), "OPENAI_API_KEY", "HF_TOKEN", "ABSENT_ONE"])
    assert rc == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # What `ray start` would see after `. ~/.bpo-ray.env`: the exact values, nothing else.
    shown = subprocess.run(["bash", "-c", f". {shlex.quote(str(out))}; printf '%s\\0%s\\0%s' "
                            "\"$OPENAI_API_KEY\" \"$HF_TOKEN\" \"${ABSENT_ONE-unset}\""],
                           capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert shown.stdout.split("\0") == [tricky, "hf_plain", "unset"]


def test_node_secrets_never_prints_values(s3_server, tmp_path, capsys):
    import boto3

    node_secrets = _load_node_secrets()
    boto3.client("ssm", endpoint_url=s3_server["endpoint"], region_name="us-east-1").put_parameter(
        Name="/bpo-test2/OPENAI_API_KEY", Value="sk-never-in-logs-1234567890", Type="SecureString", Overwrite=True)
    node_secrets.main(["--prefix", "/bpo-test2/", "--region", "us-east-1", "--endpoint-url",
                       s3_server["endpoint"], "--out", str(tmp_path / "env"), "OPENAI_API_KEY"])
    printed = capsys.readouterr()
    assert "sk-never-in-logs" not in printed.out + printed.err
    assert "wrote 1 secret" in printed.out
    with pytest.raises(SystemExit):
        node_secrets.main(["--out", str(tmp_path / "env"), "NOT-A-NAME"])


def _load_node_secrets():
    spec = importlib.util.spec_from_file_location("node_secrets", CLUSTER / "node_secrets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


def _kuberay_docs() -> dict[str, list[dict]]:
    docs = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, d) for name, ds in _kuberay_docs().items() for d in ds if d["kind"] == kind]


def _pod_templates(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, pod spec) for the head and every worker group."""
    out = [("head", cluster_spec["headGroupSpec"], cluster_spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g, g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return out


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for _, d in _by_kind("RayCluster")]
    specs += [(f"RayService {d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for _, d in _by_kind("RayService")]
    return specs


def test_kuberay_manifests_have_the_expected_kinds():
    docs = _kuberay_docs()
    assert docs, "no manifests in cluster/kuberay"
    for name, ds in docs.items():
        for d in ds:
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"{name}: not a Kubernetes object"
            if d["kind"] in ("RayCluster", "RayJob", "RayService"):
                assert d["apiVersion"] == "ray.io/v1", f"{name}: {d['apiVersion']}"
    assert len(_by_kind("RayCluster")) == 1
    assert len(_by_kind("RayService")) == 1
    job_stages = sorted(d["metadata"]["labels"]["app.kubernetes.io/component"] for _, d in _by_kind("RayJob"))
    assert job_stages == sorted(BATCH_STAGES)
    for name, ds in docs.items():
        _assert_no_secrets(KUBERAY / name)


def test_kuberay_versions_match_pyproject():
    version, ray_pin = _pyproject_versions()
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray_pin}-"), f"Dockerfile base {base} != ray {ray_pin}"
    base_suffix = base.split(f"{ray_pin}-", 1)[1]  # e.g. py311-cu128
    images = set()
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == ray_pin, f"{where}: rayVersion {spec['rayVersion']} != {ray_pin}"
        for group, _, pod in _pod_templates(spec):
            for c in pod["containers"]:
                images.add(c["image"])
                tag = c["image"].rsplit(":", 1)[1]
                assert tag == f"{version}-ray{ray_pin}-{base_suffix}", f"{where}/{group}: image tag {tag}"
    assert len(images) == 1, f"one image for every pod, found {images}"
    assert "requirements/gpu.txt" in dockerfile


def test_kuberay_resources_are_sane():
    cfg = _llava_config()
    for where, spec in _cluster_specs():
        groups = _pod_templates(spec)
        head_group, head_pod = groups[0][1], groups[0][2]
        assert head_group["rayStartParams"].get("num-cpus") == "0", f"{where}: tasks could land on the head"
        for group, gspec, pod in groups:
            if group != "head":
                lo, n, hi = gspec["minReplicas"], gspec.get("replicas", 0), gspec["maxReplicas"]
                assert 0 <= lo <= n <= hi and hi >= 1, f"{where}/{group}: replicas {lo} <= {n} <= {hi}"
            for c in pod["containers"]:
                res = c["resources"]
                for key in ("cpu", "memory"):
                    assert res["limits"][key] == res["requests"][key], f"{where}/{group}: {key} request != limit"
                gpus = res["limits"].get("nvidia.com/gpu", 0)
                if group == "head":
                    assert gpus == 0, f"{where}: the head must be a CPU pod"
                if gpus:
                    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), \
                        f"{where}/{group}: GPU pod without the GPU taint toleration"
                    assert any(m["mountPath"] == "/dev/shm" for m in c.get("volumeMounts", [])), \
                        f"{where}/{group}: GPU pod without a /dev/shm volume"
            assert pod.get("serviceAccountName") == "bpo-ray", f"{where}/{group}: no S3 identity"
    cluster = _by_kind("RayCluster")[0][1]["spec"]
    by_group = {g: (gs, pod) for g, gs, pod in _pod_templates(cluster)}
    gen_spec, gen_pod = by_group["gpu-generate"]
    gen_res = gen_pod["containers"][0]["resources"]["limits"]
    for pool in (cfg.generate.sampler.pool, cfg.generate.injector.pool):
        assert float(gen_res["cpu"]) >= pool.num_cpus and gen_res["nvidia.com/gpu"] >= pool.num_gpus
    assert gen_spec["maxReplicas"] * gen_res["nvidia.com/gpu"] >= cfg.generate.sampler.pool.max_size
    train_spec, train_pod = by_group["gpu-train"]
    train_gpus = train_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    max_train_workers = max(cfg.train.num_workers) if isinstance(cfg.train.num_workers, tuple) else cfg.train.num_workers
    assert train_gpus >= 4 and train_spec["maxReplicas"] * train_gpus >= max_train_workers


def test_kuberay_jobs_name_real_entrypoints_configs_and_runtime_env():
    cluster_name = _by_kind("RayCluster")[0][1]["metadata"]["name"]
    workdir = re.search(r"^WORKDIR\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    laptop_env = _runtime_env()
    for fname, job in _by_kind("RayJob"):
        stage = job["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}, fname
        assert not spec.get("shutdownAfterJobFinishes"), f"{fname}: must not delete the shared cluster"
        argv = shlex.split(spec["entrypoint"])
        # the installed package's entry point: works in the image without the checkout's jobs/
        assert argv[:4] == ["python", "-m", "bpo_ray", stage], f"{fname}: entrypoint {argv[:4]}"
        config = argv[argv.index("--config") + 1]
        from bpo_ray.config import load_config, resolve_config_path

        assert Path(resolve_config_path(config)).is_file(), f"{fname}: --config {config} is no named config"
        root = load_config(config).storage.root.rstrip("/")
        for uri in (a for a in argv if a.startswith("s3://")):
            assert uri.startswith(root + "/"), f"{fname}: {uri} outside storage.root {root}"
        from bpo_ray.cli import COMMANDS

        parser = importlib.import_module(COMMANDS[stage][0]).build_parser()
        parser.parse_args(argv[4:])  # the stage's own CLI accepts the arguments (exits 2 if not)
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert env["working_dir"] == workdir, f"{fname}: working_dir is not the image's code dir"
        assert env["env_vars"] == laptop_env["env_vars"], f"{fname}: env differs from cluster/runtime_env.yaml"
        assert env["excludes"] == laptop_env["excludes"]
        assert env.get("config") == laptop_env.get("config")


def test_kuberay_service_serves_the_apps_of_serve_config():
    """serveConfigV2 names the same applications (routes, import paths) as serve/config.yaml,
    its import paths resolve, and its args are accepted by the real app-args parser."""
    from bpo_ray.serving.apps import config_from_app_args

    (_, service), = _by_kind("RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())

    def shape(cfg: dict) -> list[tuple]:
        return sorted((a["name"], a["route_prefix"], a["import_path"], tuple(sorted(a.get("args", {}))))
                      for a in cfg["applications"])

    assert shape(served) == shape(local)
    for app in served["applications"]:
        module_name, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module_name), attr)), app["import_path"]
        cfg = config_from_app_args(app["args"])  # raises on a bad config, override or adapter name
        for name, uri in cfg.serve.model.adapters.items():
            assert uri.startswith(cfg.storage.root.rstrip("/") + "/"), f"adapter {name} outside storage.root"
    model_args = next(a["args"] for a in served["applications"] if a["name"] == "model")
    cfg = config_from_app_args(model_args)
    evaluate_job = next(d for _, d in _by_kind("RayJob") if d["metadata"]["name"] == "bpo-evaluate")
    argv = shlex.split(evaluate_job["spec"]["entrypoint"])
    served_names = {cfg.serve.model.served_name, *cfg.serve.model.adapters}
    assert argv[argv.index("--model") + 1] in served_names, "evaluate asks for a model the service does not serve"
    assert f"{service['metadata']['name']}-serve-svc" in argv[argv.index("--model-url") + 1]
    group = next(g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu-serve")
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert group["maxReplicas"] * gpus >= cfg.serve.model.autoscaling.max_replicas * cfg.serve.model.num_gpus
