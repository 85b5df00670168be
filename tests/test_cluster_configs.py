"""cluster/: the ray-up YAMLs validate against the JSON schema Ray ships (the check `ray up` runs
first), the KubeRay RayJob manifest has the fields the CRD requires and an entrypoint our CLI
accepts, and the job runtime_env uploads the code and nothing heavy. No cloud, no Ray cluster."""
import copy
import json
import os
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.conftest import ROOT

CLUSTER = os.path.join(ROOT, "cluster")
RAY_UP = ["aws.yaml", "gcp.yaml"]


def load(name: str):
    with open(os.path.join(CLUSTER, name)) as fh:
        return yaml.safe_load(fh)


def ray_schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as fh:
        return json.load(fh)


def requirements() -> dict[str, str]:
    """requirements.txt as {package name: full requirement line}."""
    reqs = {}
    with open(os.path.join(ROOT, "requirements.txt")) as fh:
        for line in fh:
            line = line.split("#")[0].strip()
            if line:
                reqs[re.split(r"[\[=<>~! ]", line, maxsplit=1)[0].lower()] = line
    return reqs


# -- ray up: AWS and GCP ----------------------------------------------------------------------
@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_yaml_validates_against_rays_schema(name):
    schema = ray_schema()
    errors = [e.message for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(load(name))]
    assert errors == [], errors


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_yaml_passes_rays_own_preparation(name):
    # what `ray up` does before launching anything: merge the provider's defaults, validate
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(name))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", RAY_UP)
def test_schema_check_is_not_vacuous(name):
    broken = copy.deepcopy(load(name))
    broken["setup_command"] = broken.pop("setup_commands")  # a typo `ray up` must reject
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())
    broken = copy.deepcopy(load(name))
    worker = next(t for t in broken["available_node_types"].values() if t["resources"].get("GPU"))
    worker["resources"]["GPU"] = 0.5  # node resources are whole numbers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_yaml_cpu_head_gpu_workers_and_project_setup(name):
    cfg = load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    gpu_workers = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "a GPU worker group"
    # enough GPU workers come up for the default two-replica run: ray_train fails fast, it does
    # not wait for the autoscaler
    assert sum(t.get("min_workers", 0) * t["resources"]["GPU"] for t in gpu_workers) >= 2
    assert cfg["file_mounts"].get("~/ray-train") == "."
    assert any("pip install" in c and "~/ray-train/requirements.txt" in c for c in cfg["setup_commands"])
    # the images carry the Ray version requirements.txt pins, for the Python this project uses
    pinned = requirements()["ray"].split("==")[1]
    for image in (cfg["docker"]["head_image"], cfg["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{pinned}-py311"), image
    assert cfg["docker"]["worker_image"].endswith("-gpu")
    # token authentication on every node, with the token that the client holds
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in cfg[key]), key


# -- KubeRay RayJob ---------------------------------------------------------------------------
def rayjob_docs() -> tuple[dict, dict]:
    with open(os.path.join(CLUSTER, "rayjob.yaml")) as fh:
        docs = {d["kind"]: d for d in yaml.safe_load_all(fh) if d}
    return docs["RayJob"], docs


def test_rayjob_has_the_fields_the_crd_requires():
    job, _ = rayjob_docs()
    assert job["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])  # a DNS-1123 label
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        for field in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert field in group, field
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in groups
            for c in g["template"]["spec"]["containers"]]
    assert max(gpus) >= 1, "a GPU worker group"
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == requirements()["ray"].split("==")[1]


def test_rayjob_entrypoint_is_a_valid_training_command(monkeypatch):
    from ray_train.cli.train import parse_config

    monkeypatch.chdir(ROOT)  # the entrypoint runs in the job's working dir, a copy of this tree
    job, _ = rayjob_docs()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "scripts/train.py"]
    cfg, _ = parse_config(argv[2:])  # our own CLI accepts the flags (a typo would raise UserError)
    assert cfg.resources.gpus_per_replica >= 1
    assert cfg.run.storage.startswith("/mnt/shared/")


def test_rayjob_runtime_env_and_shared_volume():
    from ray.runtime_env import RuntimeEnv

    job, docs = rayjob_docs()
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of the fields
    # a submitter pod has no copy of this tree: the code must come from a remote zip
    assert re.match(r"(https|s3|gs)://.+\.zip$", env["working_dir"])
    # the image has Ray; every other requirement is installed, at the same pins
    wanted = {name: line for name, line in requirements().items() if name != "ray"}
    assert sorted(env["pip"]) == sorted(wanted.values())
    claim = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    storage = shlex.split(job["spec"]["entrypoint"])
    storage = storage[storage.index("--storage") + 1]
    pod_specs = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pod_specs:
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = [m for c in pod["containers"] for m in c["volumeMounts"]]
        assert any(volumes.get(m["name"]) == claim["metadata"]["name"] and storage.startswith(m["mountPath"])
                   for m in mounts), "every pod sees the --storage path on the shared claim"


# -- the job runtime_env (ray job submit --runtime-env cluster/runtime_env.yaml) ----------------
def test_job_runtime_env_uploads_the_code_and_nothing_heavy(tmp_path):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    RuntimeEnv(**env)
    # the job's working_dir reaches every worker's path: a PYTHONPATH would hide the uploaded copy
    assert "PYTHONPATH" not in env.get("env_vars", {})
    package = tmp_path / "pkg.zip"
    # .gitignore ignored here on purpose: the excludes alone must keep the heavy folders out
    create_package(ROOT, package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    for needed in ("ray_train/cli/train.py", "ray_train/strategies/sync/engine.py", "models/registry.py", "scripts/train.py",
                   "configs/default.yaml", "requirements.txt", "pyproject.toml"):
        assert needed in names, needed
    assert any(n.startswith("models/") for n in names)
    heavy = [n for n in names if Path(n).parts[0] in (".venv", "runs", ".git")]
    assert not heavy, heavy[:5]
    assert package.stat().st_size < GCS_STORAGE_MAX_SIZE / 10, package.stat().st_size
