"""The files under cluster/ are checked offline, without a cloud account or a Kubernetes API.

* Cluster-launcher YAML (aws.yaml, gcp.yaml): the JSON schema shipped inside the installed
  ray package, then Ray's own ``prepare_config`` + ``validate_config`` (defaults merge and
  cross-field checks; both work offline), then this project's layout rules (CPU-0 head,
  on-demand trial-driver nodes with TRAIN_DRIVER, spot + on-demand GPU workers from 0).
* KubeRay manifests: cluster/schemas/kuberay-v1.schema.json (a reduced structural schema
  written from the KubeRay v1 field names) plus checks a schema cannot express
  (minReplicas <= replicas <= maxReplicas, RayJob's cluster = the RayCluster).
* Dockerfile and images: every version they name equals the pin in pyproject.toml.

Each rule is also run on a deliberately broken copy, which must fail.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.label_utils import validate_node_labels
from ray.autoscaler._private.util import prepare_config, validate_config

from automl_ad.tuning.budget import parse_budget

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
DRIVER_RESOURCE = "TRAIN_DRIVER"


# ---------------------------------------------------------------- shared helpers


def load_yaml(name: str) -> dict[str, Any]:
    with open(CLUSTER / name) as handle:
        return yaml.safe_load(handle)


def ray_launcher_schema() -> dict[str, Any]:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(schema_path.read_text())


def kuberay_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((CLUSTER / "schemas" / "kuberay-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def pyproject_pins() -> dict[str, str]:
    """``{"torch": "2.14.1", "ray": "2.60.0", ...}`` from ``name[extras]==version`` lines."""
    pins = {}
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", requirement)
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def python_tag() -> str:
    """``py311`` from ``requires-python = ">=3.11,<3.12"``."""
    match = re.search(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"])
    assert match, "requires-python has no lower bound"
    return f"py3{match.group(1)}"


# ---------------------------------------------------------- cluster launcher YAML


def validate_launcher(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's checks, as `ray up` runs them before touching the cloud; returns the merged config."""
    jsonschema.validate(config, ray_launcher_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def is_spot(provider_type: str, node_config: dict[str, Any]) -> bool:
    if provider_type == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType", "").lower() == "spot"
    if provider_type == "gcp":
        scheduling = node_config.get("scheduling", {})
        return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True
    raise AssertionError(f"no spot rule for provider {provider_type!r}")


def launcher_layout_problems(config: dict[str, Any]) -> list[str]:
    """This project's rules for a search cluster; an empty list means the layout is right."""
    problems = []
    provider_type = config["provider"]["type"]
    node_types = config["available_node_types"]
    head_name = config["head_node_type"]
    head = node_types[head_name]
    if head["resources"].get("CPU") != 0:
        problems.append(f"head node type {head_name!r}: resources.CPU must be 0 so no trial work lands on it")
    if not config.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be > 0 so idle GPU nodes are returned")

    workers = {name: spec for name, spec in node_types.items() if name != head_name}
    drivers = {name: spec for name, spec in workers.items() if spec["resources"].get(DRIVER_RESOURCE, 0) > 0}
    gpu_types = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) > 0}
    if not drivers:
        problems.append(f"no worker node type carries {DRIVER_RESOURCE}")
    for name, spec in drivers.items():
        if is_spot(provider_type, spec["node_config"]):
            problems.append(f"{name}: trial drivers must run on on-demand nodes")
        if spec.get("min_workers", 0) < 1:
            problems.append(f"{name}: min_workers >= 1 so {DRIVER_RESOURCE} exists before the first trial")
        if spec["resources"].get("GPU", 0):
            problems.append(f"{name}: driver nodes need no GPU")
    spot = {name for name, spec in gpu_types.items() if is_spot(provider_type, spec["node_config"])}
    on_demand = set(gpu_types) - spot
    if not spot or not on_demand:
        problems.append(f"need spot and on-demand GPU node types, got spot={sorted(spot)} on-demand={sorted(on_demand)}")
    for name, spec in gpu_types.items():
        if spec.get("min_workers", 0) != 0:
            problems.append(f"{name}: GPU node types scale from min_workers 0")
        if spec.get("max_workers", 0) < 1:
            problems.append(f"{name}: max_workers must be >= 1")
    if spot and on_demand:
        lowest_spot = min(gpu_types[name].get("priority", 0) for name in spot)
        highest_on_demand = max(gpu_types[name].get("priority", 0) for name in on_demand)
        if lowest_spot <= highest_on_demand:
            problems.append("spot GPU types need a higher priority than on-demand ones")
    reachable = sum(spec.get("max_workers", 0) for spec in workers.values())
    if config["max_workers"] < reachable:
        problems.append(f"max_workers {config['max_workers']} < sum of per-type max_workers {reachable}")
    for name, spec in workers.items():
        try:
            validate_node_labels(spec.get("labels", {}))
        except ValueError as error:
            problems.append(f"{name}: {error}")
    return problems


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_schema_and_validation(name: str) -> None:
    config = load_yaml(name)
    prepared = validate_launcher(config)
    # prepare_config merged Ray's provider defaults, and kept our setup on every node.
    assert prepared["head_start_ray_commands"] and prepared["worker_start_ray_commands"]
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any("pip install" in command and "/home/ray/automl_ad" in command for command in commands)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_layout_follows_project_rules(name: str) -> None:
    assert launcher_layout_problems(load_yaml(name)) == []


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _gpu_spot(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"]["gpu_spot"]


LAUNCHER_TYPOS: dict[str, Callable[[dict[str, Any]], None]] = {
    "top-level max_worker": lambda c: _rename(c, "max_workers", "max_worker"),
    "top-level idle_timeout_minute": lambda c: _rename(c, "idle_timeout_minutes", "idle_timeout_minute"),
    "node type max_worker": lambda c: _rename(_gpu_spot(c), "max_workers", "max_worker"),
    "node type min_worker": lambda c: _rename(_gpu_spot(c), "min_workers", "min_worker"),
    "node type resource as a fraction": lambda c: _gpu_spot(c)["resources"].update(GPU=0.5),
    "docker imag": lambda c: _rename(c["docker"], "image", "imag"),
    "node type without node_config": lambda c: _gpu_spot(c).pop("node_config"),
}


@pytest.mark.parametrize("name", LAUNCHER_FILES)
@pytest.mark.parametrize("mutation", sorted(LAUNCHER_TYPOS))
def test_launcher_typo_fails_validation(name: str, mutation: str) -> None:
    config = load_yaml(name)
    validate_launcher(config)  # the original passes, so the failure below is the mutation's
    LAUNCHER_TYPOS[mutation](config)
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(config)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_cross_field_errors_fail_ray_validation(name: str) -> None:
    config = load_yaml(name)
    unknown_head = copy.deepcopy(config)
    unknown_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_launcher(unknown_head)
    too_many_minimum = copy.deepcopy(config)
    _gpu_spot(too_many_minimum)["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_launcher(too_many_minimum)


LAYOUT_BREAKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "head does trial work": lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(CPU=8),
    "driver resource gone": lambda c: c["available_node_types"]["trial_driver"]["resources"].pop(DRIVER_RESOURCE),
    "driver on spot": lambda c: c["available_node_types"]["trial_driver"]["node_config"].update(
        {"InstanceMarketOptions": {"MarketType": "spot"}}
        if c["provider"]["type"] == "aws"
        else {"scheduling": {"provisioningModel": "SPOT"}}
    ),
    "GPU nodes always on": lambda c: _gpu_spot(c).update(min_workers=1),
    "no on-demand GPU fallback": lambda c: c["available_node_types"].pop("gpu_ondemand"),
    "spot not preferred": lambda c: _gpu_spot(c).update(priority=0),
    "global cap below per-type caps": lambda c: c.update(max_workers=3),
    "reserved label prefix": lambda c: _gpu_spot(c)["labels"].update({"ray.io/market": "spot"}),
}


@pytest.mark.parametrize("name", LAUNCHER_FILES)
@pytest.mark.parametrize("mutation", sorted(LAYOUT_BREAKS))
def test_launcher_layout_breaks_are_caught(name: str, mutation: str) -> None:
    config = load_yaml(name)
    LAYOUT_BREAKS[mutation](config)
    assert launcher_layout_problems(config), mutation


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_image_and_install_follow_pyproject(name: str) -> None:
    config = load_yaml(name)
    assert config["docker"]["image"] == f"rayproject/ray:{pyproject_pins()['ray']}-{python_tag()}-gpu"
    # The editable install points at the checkout that file_mounts copies from the repo root.
    mounted_repo = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted_repo, "the repository is not file-mounted"
    assert any(f"pip install --no-cache-dir -e {mounted_repo[0]}" == command for command in config["setup_commands"])


# ------------------------------------------------------------------ KubeRay manifests


def replica_problems(cluster_spec: dict[str, Any]) -> list[str]:
    """What the schema cannot say: bounds ordered, GPU groups from zero, limits >= requests."""
    problems = []
    for group in cluster_spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        low, high = group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", low)
        if not low <= replicas <= high:
            problems.append(f"{name}: need minReplicas {low} <= replicas {replicas} <= maxReplicas {high}")
        for container in group["template"]["spec"]["containers"]:
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            gpus = limits.get("nvidia.com/gpu", 0)
            if gpus and low != 0:
                problems.append(f"{name}: GPU groups scale from minReplicas 0")
            if requests.get("nvidia.com/gpu", gpus) != gpus:
                problems.append(f"{name}: nvidia.com/gpu request must equal its limit")
    return problems


def container_images(cluster_spec: dict[str, Any]) -> set[str]:
    templates = [cluster_spec["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster_spec.get("workerGroupSpecs", [])]
    return {container["image"] for template in templates for container in template["spec"]["containers"]}


def custom_resources(ray_start_params: dict[str, str]) -> dict[str, float]:
    """KubeRay passes `resources` to `ray start --resources` as a quoted JSON string."""
    text = ray_start_params.get("resources")
    if text is None:
        return {}
    return json.loads(json.loads(text))


def kuberay_problems(cluster_spec: dict[str, Any]) -> list[str]:
    problems = replica_problems(cluster_spec)
    if cluster_spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    options = cluster_spec.get("autoscalerOptions", {})
    if options.get("version") != "v2" or not options.get("idleTimeoutSeconds", 0) > 0:
        problems.append("autoscalerOptions needs version v2 and idleTimeoutSeconds > 0")
    if cluster_spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append('head rayStartParams num-cpus must be "0"')
    if cluster_spec.get("rayVersion") != pyproject_pins()["ray"]:
        problems.append(f"rayVersion {cluster_spec.get('rayVersion')} != pyproject ray pin")
    version = pyproject()["project"]["version"]
    for image in container_images(cluster_spec):
        if not image.endswith(f":{version}"):
            problems.append(f"image {image} is not tagged with the package version {version}")
    groups = cluster_spec.get("workerGroupSpecs", [])
    drivers = [g for g in groups if custom_resources(g["rayStartParams"]).get(DRIVER_RESOURCE, 0) > 0]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"])]
    if not drivers:
        problems.append(f"no worker group carries {DRIVER_RESOURCE}")
    for group in drivers:
        if "spot" in group["template"]["spec"].get("nodeSelector", {}).values():
            problems.append(f"{group['groupName']}: trial drivers must not run on spot nodes")
    if not gpu_groups:
        problems.append("no worker group has nvidia.com/gpu limits")
    for group in gpu_groups:
        for container in group["template"]["spec"]["containers"]:
            if container["resources"]["limits"]["nvidia.com/gpu"] != 1:
                problems.append(f"{group['groupName']}: one GPU per pod")
    return problems


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifest_passes_structural_schema(name: str) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in kuberay_validator().iter_errors(load_yaml(name))]
    assert errors == []


def test_raycluster_follows_project_rules() -> None:
    manifest = load_yaml("kuberay-raycluster.yaml")
    assert manifest["kind"] == "RayCluster"
    assert kuberay_problems(manifest["spec"]) == []


def test_rayjob_runs_one_search_on_the_same_cluster_spec() -> None:
    job = load_yaml("kuberay-rayjob.yaml")
    cluster = load_yaml("kuberay-raycluster.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["automl-ad", "search"] or argv[:3] == ["python", "cli.py", "search"]
    options = dict(zip(argv, argv[1:]))  # each flag -> the token after it
    budget = parse_budget(options["--budget"])
    assert (budget.kind, budget.device) == ("device", "gpu")
    assert re.match(r"^(s3|gs)://[^/]+/.+", options["--storage"])
    assert options["--address"] == "auto"
    assert options["--category"] == job["metadata"]["labels"]["automl-ad/category"]


def _worker_group(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    return next(group for group in spec["workerGroupSpecs"] if group["groupName"] == name)


def _gpu_container(manifest: dict[str, Any]) -> dict[str, Any]:
    return _worker_group(manifest, "gpu-spot")["template"]["spec"]["containers"][0]


KUBERAY_SCHEMA_BREAKS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "minReplica typo": ("kuberay-raycluster.yaml", lambda m: _rename(_worker_group(m, "gpu-spot"), "minReplicas", "minReplica")),
    "maxReplicas as a string": ("kuberay-raycluster.yaml", lambda m: _worker_group(m, "gpu-spot").update(maxReplicas="8")),
    "unknown spec key": ("kuberay-raycluster.yaml", lambda m: _rename(m["spec"], "enableInTreeAutoscaling", "enableInTreeAutoscale")),
    "num-cpus as an int": ("kuberay-raycluster.yaml", lambda m: m["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
    "container without image": ("kuberay-raycluster.yaml", lambda m: _gpu_container(m).pop("image")),
    "containers not a list": ("kuberay-raycluster.yaml", lambda m: _worker_group(m, "gpu-spot")["template"]["spec"].update(containers=_gpu_container(m))),
    "GPU limit not a quantity": ("kuberay-raycluster.yaml", lambda m: _gpu_container(m)["resources"]["limits"].update({"nvidia.com/gpu": "one"})),
    "limit typo": ("kuberay-raycluster.yaml", lambda m: _rename(_gpu_container(m)["resources"], "limits", "limit")),
    "autoscaler v3": ("kuberay-raycluster.yaml", lambda m: m["spec"]["autoscalerOptions"].update(version="v3")),
    "old apiVersion": ("kuberay-raycluster.yaml", lambda m: m.update(apiVersion="ray.io/v1alpha1")),
    "group name with capitals": ("kuberay-raycluster.yaml", lambda m: _worker_group(m, "gpu-spot").update(groupName="GPU_spot")),
    "job without a cluster": ("kuberay-rayjob.yaml", lambda m: m["spec"].pop("rayClusterSpec")),
    "job with spec and selector": ("kuberay-rayjob.yaml", lambda m: m["spec"].update(clusterSelector={"ray.io/cluster": "automl-ad"})),
    "entrypoint as a list": ("kuberay-rayjob.yaml", lambda m: m["spec"].update(entrypoint=shlex.split(m["spec"]["entrypoint"]))),
    "shutdownAfterJobFinish typo": ("kuberay-rayjob.yaml", lambda m: _rename(m["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
    "typo inside the job's cluster": ("kuberay-rayjob.yaml", lambda m: _rename(_worker_group(m, "gpu-ondemand"), "maxReplicas", "maxReplica")),
}


@pytest.mark.parametrize("mutation", sorted(KUBERAY_SCHEMA_BREAKS))
def test_kuberay_typo_fails_schema(mutation: str) -> None:
    file_name, mutate = KUBERAY_SCHEMA_BREAKS[mutation]
    manifest = load_yaml(file_name)
    validator = kuberay_validator()
    assert list(validator.iter_errors(manifest)) == []
    mutate(manifest)
    assert list(validator.iter_errors(manifest)), mutation


def test_a_clusterselector_job_is_valid() -> None:
    # Reusing a running RayCluster is the documented alternative to rayClusterSpec.
    manifest = load_yaml("kuberay-rayjob.yaml")
    manifest["spec"].pop("rayClusterSpec")
    manifest["spec"]["clusterSelector"] = {"ray.io/cluster": "automl-ad"}
    assert list(kuberay_validator().iter_errors(manifest)) == []


KUBERAY_RULE_BREAKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "min above max": lambda s: next(g for g in s["workerGroupSpecs"] if g["groupName"] == "gpu-spot").update(minReplicas=9, replicas=9),
    "replicas above max": lambda s: next(g for g in s["workerGroupSpecs"] if g["groupName"] == "gpu-spot").update(replicas=20),
    "autoscaling off": lambda s: s.update(enableInTreeAutoscaling=False),
    "head takes trials": lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": "8"}),
    "ray version drift": lambda s: s.update(rayVersion="2.59.0"),
    "image tag drift": lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(image="ghcr.io/x/automl-ad:latest"),
    "driver resource gone": lambda s: next(g for g in s["workerGroupSpecs"] if g["groupName"] == "trial-driver")["rayStartParams"].pop("resources"),
    "driver on spot": lambda s: next(g for g in s["workerGroupSpecs"] if g["groupName"] == "trial-driver")["template"]["spec"].update(nodeSelector={"karpenter.sh/capacity-type": "spot"}),
    "two GPUs per pod": lambda s: next(g for g in s["workerGroupSpecs"] if g["groupName"] == "gpu-spot")["template"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": 2}),
}


@pytest.mark.parametrize("mutation", sorted(KUBERAY_RULE_BREAKS))
def test_kuberay_rule_breaks_are_caught(mutation: str) -> None:
    spec = load_yaml("kuberay-raycluster.yaml")["spec"]
    KUBERAY_RULE_BREAKS[mutation](spec)
    assert kuberay_problems(spec), mutation


# ------------------------------------------------------------------------ Dockerfile


def dockerfile_problems(text: str) -> list[str]:
    """Every version the Dockerfile names must be pyproject's pin."""
    pins = pyproject_pins()
    problems = []
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)-(py3\d+)-gpu\s*$", text, re.MULTILINE)
    if not base:
        problems.append("FROM is not rayproject/ray:<version>-<python>-gpu")
    else:
        if base.group(1) != pins["ray"]:
            problems.append(f"base image ray {base.group(1)} != pyproject ray {pins['ray']}")
        if base.group(2) != python_tag():
            problems.append(f"base image {base.group(2)} != requires-python {python_tag()}")
    named = {name.lower(): version for name, version in re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", text)}
    for name in ("torch", "torchvision"):
        if name not in named:
            problems.append(f"{name} is not pinned in the Dockerfile")
    for name, version in named.items():
        if pins.get(name) != version:
            problems.append(f"{name}=={version} but pyproject pins {pins.get(name)}")
    if not re.search(r"^RUN\s+pip install[^\n]*-e \.", text, re.MULTILINE):
        problems.append("the package is not installed (pip install -e .)")
    if not re.search(r"^COPY\b[^\n]*\bautoml_ad ", text, re.MULTILINE):
        problems.append("automl_ad/ (the code and its packaged search spaces) is not copied into the image")
    return problems


def test_dockerfile_versions_follow_pyproject() -> None:
    assert dockerfile_problems((CLUSTER / "Dockerfile").read_text()) == []


@pytest.mark.parametrize(
    "old, new",
    [
        ("torch==2.14.1", "torch==2.13.0"),
        ('"torchvision==0.29.1"', ""),
        ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.59.0-py311-gpu"),
        ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py312-gpu"),
        ("COPY --chown=ray:users automl_ad ./automl_ad", ""),
    ],
)
def test_dockerfile_drift_is_caught(old: str, new: str) -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert old in text
    assert dockerfile_problems(text.replace(old, new))


def test_cluster_readme_names_only_existing_files() -> None:
    readme = (CLUSTER / "README.md").read_text()
    mentioned = set(re.findall(r"\bcluster/[A-Za-z0-9_./-]+\.(?:yaml|json|md)\b|\bcluster/Dockerfile\b", readme))
    assert mentioned, "README names no cluster files"
    assert sorted(path for path in mentioned if not (ROOT / path).exists()) == []
