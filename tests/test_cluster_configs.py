"""The cluster configs in cluster/ are valid for the installed Ray and secure by default.

Validation is Ray's own. Each cluster-launcher YAML (aws, gcp, local) is checked twice:
the raw file against the JSON schema the installed package ships
(`ray/autoscaler/ray-schema.json`), and the result of `prepare_config` (Ray's provider
defaults merged in, as `ray up` does) with `validate_config`, which applies that schema plus
Ray's cross-field checks. Deliberately broken copies must fail the same checks. The KubeRay
manifest has no schema in the ray package, so its structure is checked directly.

Nothing here starts Ray, opens a socket or needs cloud credentials.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_CONFIGS = ("aws", "gcp", "local")
CLOUD_CONFIGS = ("aws", "gcp")
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
RAY_MAJOR_MINOR = tuple(int(x) for x in ray.__version__.split(".")[:2])

COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _load(name: str) -> dict:
    with open(CLUSTER_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def _text(name: str) -> str:
    return (CLUSTER_DIR / f"{name}.yaml").read_text()


def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def _validate(config: dict) -> None:
    """Raise if Ray would reject `config`: raw schema check, then what `ray up` runs."""
    jsonschema.validate(config, _schema())
    validate_config(prepare_config(copy.deepcopy(config)))


def _commands(config: dict) -> list[str]:
    return [cmd for key in COMMAND_LISTS for cmd in config.get(key) or []]


def _head_start(config: dict) -> str:
    (cmd,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    return cmd


def _mlflow_server(config: dict) -> str:
    (cmd,) = [c for c in _commands(config) if "mlflow server" in c]
    return cmd


# --- Ray's own validation ----------------------------------------------------------------


def test_schema_is_the_one_shipped_with_ray():
    schema = _schema()
    # The negative tests below rely on the schema rejecting unknown top-level keys.
    assert schema["additionalProperties"] is False
    assert {"cluster_name", "provider"} <= set(schema["required"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name):
    _validate(_load(name))


def _misspelled_top_level_key(c):
    c["setup_comands"] = c.pop("setup_commands")


def _max_workers_not_an_integer(c):
    c["max_workers"] = "eight"


def _commands_not_a_list(c):
    c["head_start_ray_commands"] = "ray start --head"


def _provider_without_type(c):
    del c["provider"]["type"]


def _node_type_without_resources(c):
    worker = next(k for k in c["available_node_types"] if k != c["head_node_type"])
    del c["available_node_types"][worker]["resources"]


def _fractional_gpu_resource(c):
    worker = next(k for k in c["available_node_types"] if k != c["head_node_type"])
    c["available_node_types"][worker]["resources"]["GPU"] = 0.5


def _unknown_head_node_type(c):
    c["head_node_type"] = "no-such-type"


def _min_workers_above_max_workers(c):
    worker = next(k for k in c["available_node_types"] if k != c["head_node_type"])
    c["available_node_types"][worker]["min_workers"] = c["max_workers"] + 1


ANY_CONFIG_BREAKS = (
    _misspelled_top_level_key,
    _max_workers_not_an_integer,
    _commands_not_a_list,
    _provider_without_type,
)
# The local provider replaces available_node_types with its own single type.
NODE_TYPE_BREAKS = (
    _node_type_without_resources,
    _fractional_gpu_resource,
    _unknown_head_node_type,
    _min_workers_above_max_workers,
)


@pytest.mark.parametrize(
    "name,breakage",
    [(n, b) for n in LAUNCHER_CONFIGS for b in ANY_CONFIG_BREAKS]
    + [(n, b) for n in CLOUD_CONFIGS for b in NODE_TYPE_BREAKS],
    ids=lambda v: v.__name__.strip("_") if callable(v) else v,
)
def test_broken_copy_fails_ray_validation(name, breakage):
    config = _load(name)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(config)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_rays_validate_config_alone_rejects_a_misspelled_key(name):
    config = _load(name)
    _misspelled_top_level_key(config)
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(prepare_config(config))


# --- what the launcher configs set up ----------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_commands_are_valid_bash(name):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    for cmd in _commands(_load(name)):
        result = subprocess.run([bash, "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_project_is_copied_and_installed(name):
    config = _load(name)
    assert config["file_mounts"]["~/raven"] == "."
    assert any(re.search(r"pip install\b.*-e ~/raven", c) for c in config["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_pinned_ray_matches_installed_ray(name):
    pins = re.findall(r"ray\[[^\]]*\]==(\d+)\.(\d+)", " ".join(_commands(_load(name))))
    assert pins, "setup commands should pin Ray so client and cluster agree"
    for major, minor in pins:
        assert (int(major), int(minor)) == RAY_MAJOR_MINOR


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cpu_head_and_autoscaling_gpu_workers(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for k, t in types.items() if k != config["head_node_type"]]
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers
    for t in gpu_workers:
        assert t.get("min_workers", 0) == 0
        assert t["max_workers"] >= 1


def test_aws_instance_types():
    types = _load("aws")["available_node_types"]
    assert types["head"]["node_config"]["InstanceType"] == "m5.xlarge"
    assert types["gpu"]["node_config"]["InstanceType"] == "g5.xlarge"


def test_gcp_gpu_workers_have_t4_and_terminate_on_maintenance():
    types = _load("gcp")["available_node_types"]
    assert types["head"]["node_config"]["machineType"] == "n1-standard-4"
    gpu = types["gpu"]["node_config"]
    assert gpu["guestAccelerators"][0]["acceleratorType"] == "nvidia-tesla-t4"
    assert gpu["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_local_config_lists_head_and_workers():
    provider = _load("local")["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"]
    assert provider["worker_ips"]


# --- security defaults: launcher configs -------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_dashboard_bound_to_loopback(name):
    config = _load(name)
    assert "--head" in _head_start(config)
    assert "--dashboard-host=127.0.0.1" in _head_start(config)
    assert not re.search(r"dashboard-host[= ]+0\.0\.0\.0", _text(name))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_mlflow_server_on_head_bound_to_loopback(name):
    config = _load(name)
    assert all("mlflow server" not in c for c in config["worker_start_ray_commands"])
    cmd = _mlflow_server(config)
    assert cmd in config["head_start_ray_commands"]
    assert "--host 127.0.0.1" in cmd and "--port 5000" in cmd
    assert "--backend-store-uri" in cmd and "sqlite:///" in cmd
    assert "--artifacts-destination" in cmd
    assert not re.search(r"--host[= ]+0\.0\.0\.0", _text(name))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_token_auth_on_for_every_ray_start(name):
    config = _load(name)
    assert "RAY_AUTH_MODE=disabled" not in _text(name).replace(" ", "")
    starts = [c for c in _commands(config) if "ray start" in c]
    assert len(starts) == 2  # head and workers
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_token_comes_from_secret_manager(name):
    commands = " ".join(_commands(_load(name)))
    fetch = {"aws": "aws secretsmanager get-secret-value", "gcp": "gcloud secrets versions access"}
    assert f'RAY_AUTH_TOKEN="$({fetch[name]}' in commands


def test_local_token_comes_from_the_operators_token_file():
    config = _load("local")
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]


def _public_non_ssh_rules(rules: list[dict]) -> list[dict]:
    """Ingress rules open to the whole internet on anything but TCP 22."""
    bad = []
    for rule in rules:
        sources = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        sources |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if sources & {"0.0.0.0/0", "::/0"}:
            ssh_only = rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == rule.get("ToPort") == 22
            if not ssh_only:
                bad.append(rule)
    return bad


def test_aws_security_group_opens_only_ssh_to_the_internet():
    rules = _load("aws")["provider"]["security_group"]["IpPermissions"]
    assert _public_non_ssh_rules(rules) == []


@pytest.mark.parametrize(
    "rule",
    [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "-1", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ],
    ids=["dashboard", "all-tcp-ipv6", "all-traffic"],
)
def test_security_group_check_catches_open_ports(rule):
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    private = {"IpProtocol": "-1", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
    assert _public_non_ssh_rules([ssh, private]) == []
    assert _public_non_ssh_rules([ssh, private, rule]) == [rule]


def test_gcp_nodes_use_the_firewalled_subnet():
    for t in _load("gcp")["available_node_types"].values():
        (nic,) = t["node_config"]["networkInterfaces"]
        assert nic["subnetwork"].endswith("/subnetworks/raven-ray")


# --- KubeRay -----------------------------------------------------------------------------


def _kuberay_docs() -> list[dict]:
    with open(CLUSTER_DIR / "kuberay.yaml") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _kuberay() -> dict:
    (doc,) = _kuberay_docs()
    return doc


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _ray_containers(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in _containers(g) if c["image"].startswith("rayproject/ray")]


def test_kuberay_is_a_raycluster():
    cluster = _kuberay()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    assert all(d.get("kind") != "Secret" for d in _kuberay_docs())


def test_kuberay_head_and_gpu_worker_groups():
    spec = _kuberay()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    head_limits = _containers(head)[0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        limits = _containers(group)[0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
    assert gpu_groups, "a worker group must request nvidia.com/gpu in its limits"
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu_groups)
    for g in gpu_groups:
        assert _containers(g)[0]["image"].endswith("-gpu")


def test_kuberay_images_match_installed_ray():
    cluster = _kuberay()
    images = [c["image"] for c in _ray_containers(cluster)]
    assert len(images) >= 2
    for image in images:
        match = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)(-py3\d+)?(-gpu|-cu\d+)?", image)
        assert match, image
        assert (int(match[1]), int(match[2])) == RAY_MAJOR_MINOR, image
    major, minor, _ = cluster["spec"]["rayVersion"].split(".")
    assert (int(major), int(minor)) == RAY_MAJOR_MINOR


def test_kuberay_dashboard_and_mlflow_on_loopback():
    spec = _kuberay()["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    (mlflow,) = [c for c in _containers(spec["headGroupSpec"]) if "mlflow" in c["name"]]
    args = [*mlflow.get("command", []), *mlflow.get("args", [])]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "5000"


def _env_entries(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    entries = [e for g in groups for c in _containers(g) for e in c.get("env", [])]
    return entries + spec.get("autoscalerOptions", {}).get("env", [])


def test_kuberay_token_auth_from_a_secret():
    cluster = _kuberay()
    envs = [{e["name"]: e for e in c.get("env", [])} for c in _ray_containers(cluster)]
    envs.append({e["name"]: e for e in cluster["spec"]["autoscalerOptions"]["env"]})
    for env in envs:
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token
        assert token["valueFrom"]["secretKeyRef"]["name"]
        assert token["valueFrom"]["secretKeyRef"]["key"]


def test_kuberay_no_plaintext_secrets_in_env():
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY", re.I)
    for entry in _env_entries(_kuberay()):
        if secretish.search(entry["name"]):
            assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), entry


# --- no secrets in any file --------------------------------------------------------------

SECRET_PATTERNS = {
    "Ray token (token_hex(32))": re.compile(r"\b[0-9a-f]{64}\b"),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key", re.I),
    "password in a URI": re.compile(r"://[^/\s:@'\"]+:[^/\s@'\"]+@"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "literal Ray token": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?(?!\$\()[A-Za-z0-9_\-]{8,}"),
}


@pytest.mark.parametrize("name", (*LAUNCHER_CONFIGS, "kuberay"))
def test_no_secret_in_file(name):
    text = _text(name)
    for what, pattern in SECRET_PATTERNS.items():
        assert not pattern.search(text), f"{name}.yaml seems to contain a {what}"


def test_secret_scan_is_real():
    leaked = "export RAY_AUTH_TOKEN=" + "ab" * 32
    assert SECRET_PATTERNS["Ray token (token_hex(32))"].search(leaked)
    assert SECRET_PATTERNS["literal Ray token"].search(leaked)
    assert SECRET_PATTERNS["password in a URI"].search("postgresql://mlflow:hunter2@db:5432/mlflow")
    assert not SECRET_PATTERNS["literal Ray token"].search('RAY_AUTH_TOKEN="$(gcloud secrets ...)"')
