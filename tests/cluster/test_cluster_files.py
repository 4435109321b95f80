"""The cluster definitions in cluster/ parse, validate offline and agree with the code and with each other.

Nothing here starts Ray or talks to a cloud: the launcher YAML goes through Ray's own config preparation and
JSON schema, the KubeRay RayJob and the NetworkPolicy through small strict schemas of the fields we use.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "gpu-cluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
LOCAL_SH = CLUSTER / "local.sh"
CREDENTIALS_SH = CLUSTER / "mlflow-credentials.sh"
MLFLOW_SECRET = "decrop-mlflow-auth"  # the Kubernetes Secret the user creates (rayjob.yaml, step 0)
CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # what mlflow-credentials.sh writes

# The flags of tuning/sweep.py (value-taking unless listed in SWEEP_SWITCHES).
SWEEP_FLAGS = {
    "--profile", "--study", "--num-trials", "--max-concurrent", "--workers-per-trial", "--gpus-per-worker",
    "--cert-shards", "--mlflow-uri", "--experiment", "--resume", "--seed",
}
SWEEP_SWITCHES = {"--resume"}
SWEEP_CHOICES = {"--profile": {"quick", "paper"}}
IMAGE_RE = re.compile(r"^rayproject/ray(-ml)?:(?P<version>\d+\.\d+\.\d+)-py\d+-gpu$")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]


def _rayjob() -> dict:
    (job,) = [d for d in _rayjob_docs() if d["kind"] == "RayJob"]
    return job


def _strings(node):
    """Every string in a parsed YAML tree (keys included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _sweep_commands(text: str) -> list[list[str]]:
    """Argument lists after every `python tuning/sweep.py` in `text` (up to a quote, pipe or line end)."""
    return [shlex.split(m) for m in re.findall(r"python tuning/sweep\.py([^\"'`|;\n]*)", text)]


def _check_sweep_args(args: list[str]) -> None:
    i = 0
    while i < len(args):
        flag = args[i]
        assert flag in SWEEP_FLAGS, f"tuning/sweep.py has no flag {flag!r} (known: {sorted(SWEEP_FLAGS)})"
        if flag in SWEEP_SWITCHES:
            i += 1
            continue
        assert i + 1 < len(args) and not args[i + 1].startswith("--"), f"{flag} needs a value"
        if flag in SWEEP_CHOICES:
            assert args[i + 1] in SWEEP_CHOICES[flag], f"{flag} {args[i + 1]!r}"
        i += 2


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ----------------------------------------------------------------------------------- launcher (ray up)


def _prepared_launcher_config() -> dict:
    # Internal API of Ray 2.60.0 (ray.autoscaler._private.util): `ray up` has no dry run. If Ray moves these,
    # this test must be ported, not the YAML blamed.
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # pragma: no cover - depends on the Ray version
        pytest.fail(f"Ray {ray.__version__}: offline launcher validation API moved ({e}); port this test")
    config = prepare_config(_load(LAUNCHER))
    validate_config(config)
    return config


def test_launcher_yaml_validates_offline():
    config = _prepared_launcher_config()
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is CPU only"


def test_launcher_gpu_workers_request_gpus():
    config = _prepared_launcher_config()
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, name
        assert node["min_workers"] == 0 and node["max_workers"] >= 1, name


def test_launcher_dashboard_and_mlflow_are_not_public():
    config = _prepared_launcher_config()
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    for cmd in config["worker_start_ray_commands"]:
        assert "ray stop" in cmd or "RAY_AUTH_MODE=token" in cmd
    mlflow = " ".join(c for c in config["head_setup_commands"] if "mlflow server" in c)
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in mlflow
    assert "--host decrop-head" in mlflow, "private address only, named on every node"
    assert any("decrop-head" in c and "RAY_HEAD_IP" in c for c in config["worker_setup_commands"])
    assert "IpPermissions" not in config["provider"].get("security_group", {}), "no extra ingress rules"


def test_launcher_installs_the_project():
    config = _load(LAUNCHER)
    assert config["file_mounts"]["~/decrop"] == "."
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


# ------------------------------------------------------------------------------------- KubeRay RayJob


def _obj(properties: dict, required=(), strict=True) -> dict:
    schema = {"type": "object", "properties": properties, "required": list(required)}
    if strict:
        schema["additionalProperties"] = False
    return schema


_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_RESOURCES = _obj({"requests": {"type": "object"}, "limits": {"type": "object"}})
_CONTAINER = _obj(
    {
        "name": _STR, "image": _STR, "command": {"type": "array"}, "args": {"type": "array"},
        "env": {"type": "array"}, "ports": {"type": "array"}, "resources": _RESOURCES,
        "volumeMounts": {"type": "array"},
    },
    required=("name", "image"),
)
_POD_TEMPLATE = _obj(
    {
        "metadata": {"type": "object"},
        "spec": _obj(
            {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}, "volumes": {"type": "array"},
             "nodeSelector": {"type": "object"}, "tolerations": {"type": "array"}},
            required=("containers",),
        ),
    },
    required=("spec",),
)
# Field names of KubeRay's ray.io/v1 RayJobSpec / RayClusterSpec (v1.5+), only those this project uses or may
# plausibly use: a typo becomes an unknown field here, which a real API server would silently drop.
RAYJOB_SCHEMA = _obj(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": _obj({"name": _STR, "namespace": _STR, "labels": {"type": "object"}}, required=("name",)),
        "spec": _obj(
            {
                "entrypoint": _STR,
                "runtimeEnvYAML": _STR,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": _INT,
                "activeDeadlineSeconds": _INT,
                "backoffLimit": _INT,
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "rayClusterSpec": _obj(
                    {
                        "rayVersion": _STR,
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "authOptions": _obj({"mode": {"enum": ["disabled", "token"]}, "secretName": _STR}),
                        "headGroupSpec": _obj(
                            {"rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE,
                             "serviceType": {"enum": ["ClusterIP"]}},
                            required=("rayStartParams", "template"),
                        ),
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": _obj(
                                {"groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
                                 "rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE},
                                required=("groupName", "replicas", "minReplicas", "maxReplicas",
                                          "rayStartParams", "template"),
                            ),
                        },
                    },
                    required=("rayVersion", "headGroupSpec", "workerGroupSpecs"),
                ),
            },
            required=("entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "rayClusterSpec"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)


def test_rayjob_matches_schema():
    jsonschema.validate(_rayjob(), RAYJOB_SCHEMA)


def test_rayjob_schema_rejects_unknown_fields():
    job = _rayjob()
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}  # typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)


def test_rayjob_cluster_shape():
    spec = _rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster.get("authOptions", {}).get("mode") == "token"
    for container in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(part, {}), "head has no GPU"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_rayjob_runtime_env_agrees_with_runtime_env_yaml():
    shared = _load(RUNTIME_ENV)
    job_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    assert job_env["env_vars"] == shared["env_vars"]
    assert job_env["excludes"] == shared["excludes"]
    assert "working_dir" in job_env, "the RayJob's submitter has no local checkout: it needs a remote URI"
    assert "working_dir" not in shared, "locally and with `ray up`, working_dir comes from --working-dir ."


def test_rayjob_pip_matches_project_dependencies():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {d.replace(" ", "") for d in deps if not d.startswith("ray")}  # ray is in the image
    job_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    assert set(job_env["pip"]) == expected


def test_rayjob_services_are_cluster_internal():
    for doc in _rayjob_docs():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_mlflow_uri_points_at_the_in_cluster_service():
    (args,) = _sweep_commands(_rayjob()["spec"]["entrypoint"])
    uri = args[args.index("--mlflow-uri") + 1]
    services = {d["metadata"]["name"]: d for d in _rayjob_docs() if d["kind"] == "Service"}
    host, port = re.fullmatch(r"http://([\w.-]+):(\d+)", uri).groups()
    assert host.split(".")[0] in services
    assert int(port) in {p["port"] for p in services[host.split(".")[0]]["spec"]["ports"]}


# --------------------------------------------------------------------------- agreement across the files


def test_sweep_commands_use_existing_flags():
    sources = {
        "rayjob entrypoint": _rayjob()["spec"]["entrypoint"],
        "gpu-cluster.yaml": LAUNCHER.read_text(),
        "README.md": (CLUSTER / "README.md").read_text(),
        "local.sh": LOCAL_SH.read_text(),
    }
    for name, text in sources.items():
        commands = _sweep_commands(text)
        assert commands, f"{name} shows no `python tuning/sweep.py` command"
        for args in commands:
            _check_sweep_args(args)
    assert "--profile" in _sweep_commands(sources["rayjob entrypoint"])[0]


def test_one_image_everywhere_with_this_ray_version():
    launcher_images = {_load(LAUNCHER)["docker"]["image"]}
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    rayjob_images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert launcher_images == rayjob_images and len(rayjob_images) == 1
    (image,) = rayjob_images
    match = IMAGE_RE.match(image)
    assert match, image
    assert match["version"] == ray.__version__


def _mlflow_deployment() -> dict:
    (deployment,) = [d for d in _rayjob_docs()
                     if d["kind"] == "Deployment" and d["metadata"]["name"] == "decrop-mlflow"]
    return deployment


def _mlflow_container() -> dict:
    (container,) = _mlflow_deployment()["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("path", [LAUNCHER, RAYJOB, RUNTIME_ENV], ids=lambda p: p.name)
def test_no_service_listens_on_every_interface(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    if path == RAYJOB:
        # The one exception: MLflow binds every interface *of its pod* (its address and its loopback, which
        # `kubectl port-forward` needs), with no host network, behind the NetworkPolicy and basic auth
        # (test_rayjob_mlflow_is_admitted_only_to_the_ray_pods, test_mlflow_servers_require_basic_auth).
        command = _mlflow_container()["command"]
        assert command[command.index("--host") + 1] == "0.0.0.0"
        for doc in docs:
            if doc and doc["kind"] == "Deployment":
                doc["spec"]["template"]["spec"]["containers"][0]["command"] = []
    for text in _strings(docs):
        assert "0.0.0.0" not in text, text
        assert "LoadBalancer" not in text and "NodePort" not in text, text
    assert not any("hostNetwork" in text or "hostPort" in text for text in _strings(docs))


# --------------------------------------------------------------------------- MLflow: who may reach it


_LABEL_SELECTOR = _obj({
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": _obj(
        {"key": _STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
         "values": {"type": "array", "items": _STR}}, required=("key", "operator"))},
})
_PEER = _obj({"podSelector": _LABEL_SELECTOR, "namespaceSelector": _LABEL_SELECTOR,
              "ipBlock": _obj({"cidr": _STR, "except": {"type": "array", "items": _STR}}, required=("cidr",))})
_NP_PORT = _obj({"protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                 "port": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, _STR]},
                 "endPort": {"type": "integer", "minimum": 1, "maximum": 65535}})
# networking.k8s.io/v1 NetworkPolicy as the Kubernetes API reference defines it (every field of the spec; metadata
# reduced to what a manifest sets). Strict, as for the RayJob: a misspelt field would be dropped by the API server
# and leave the policy wider than it reads.
NETWORK_POLICY_SCHEMA = _obj(
    {
        "apiVersion": {"const": "networking.k8s.io/v1"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": _obj({"name": _STR, "namespace": _STR, "labels": {"type": "object"},
                          "annotations": {"type": "object"}}, required=("name",)),
        "spec": _obj(
            {
                "podSelector": _LABEL_SELECTOR,
                "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {"type": "array", "items": _obj({"from": {"type": "array", "items": _PEER},
                                                            "ports": {"type": "array", "items": _NP_PORT}})},
                "egress": {"type": "array", "items": _obj({"to": {"type": "array", "items": _PEER},
                                                           "ports": {"type": "array", "items": _NP_PORT}})},
            },
            required=("podSelector",),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)


def _network_policy() -> dict:
    (policy,) = [d for d in _rayjob_docs() if d["kind"] == "NetworkPolicy"]
    return policy


def test_rayjob_network_policy_matches_schema():
    jsonschema.validate(_network_policy(), NETWORK_POLICY_SCHEMA)
    policy = _network_policy()
    policy["spec"]["ingress"][0]["from"][0]["podSelecter"] = {}  # typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(policy, NETWORK_POLICY_SCHEMA)


def _selected(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked here"
    return selector["matchLabels"].items() <= labels.items()


def test_rayjob_mlflow_is_admitted_only_to_the_ray_pods():
    spec = _network_policy()["spec"]
    assert _selected(spec["podSelector"], _mlflow_deployment()["spec"]["template"]["metadata"]["labels"])
    assert "Ingress" in spec["policyTypes"]
    (rule,) = spec["ingress"]  # one rule: no other way in
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespaceSelector or ipBlock: only pods of this namespace"
    ports = {p["containerPort"] for p in _mlflow_container()["ports"]}
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", port) for port in sorted(ports)]
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"].get("metadata", {}).get("labels", {})
        assert _selected(peer["podSelector"], labels), "every Ray pod may log to MLflow"
    assert not _selected(peer["podSelector"], _mlflow_deployment()["spec"]["template"]["metadata"]["labels"])


def _secret_env(container: dict) -> dict[str, tuple[str, str]]:
    """env name -> (secret, key) of the container's variables that come from a Secret."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_mlflow_servers_require_basic_auth():
    # Kubernetes: the server's admin user and the Ray pods' client credentials come from one Secret.
    command = _mlflow_container()["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert _mlflow_container()["image"].endswith("-full"), "the plain MLflow image lacks Flask-WTF (basic auth)"
    server = _secret_env(_mlflow_container())
    assert server["MLFLOW_AUTH_ADMIN_USERNAME"] == (MLFLOW_SECRET, "MLFLOW_TRACKING_USERNAME")
    assert server["MLFLOW_AUTH_ADMIN_PASSWORD"] == (MLFLOW_SECRET, "MLFLOW_TRACKING_PASSWORD")
    assert server["MLFLOW_FLASK_SERVER_SECRET_KEY"][0] == MLFLOW_SECRET
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            assert {k: _secret_env(container).get(k) for k in CREDENTIAL_KEYS} == {
                k: (MLFLOW_SECRET, k) for k in CREDENTIAL_KEYS}, container["name"]

    # Launcher: the same credentials from a file in the user's home, copied to every node and exported there.
    config = _load(LAUNCHER)
    env_file = "~/.decrop/mlflow-auth.env"
    assert config["file_mounts"][env_file] == env_file, "from the home directory, not from the repository"
    mlflow = " ".join(c for c in config["head_setup_commands"] if "mlflow server" in c)
    assert "--app-name basic-auth" in mlflow and f". {env_file}" in mlflow
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in mlflow
    assert any("mlflow[auth]" in c for c in config["head_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert start.startswith(f"set -a && . {env_file} && set +a &&"), key
    assert any(env_file in c and "chmod 600" in c for c in config["setup_commands"])


_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_KEY", re.IGNORECASE)
# key=value or key: value where the key names a secret and the value is a literal (not a $reference or empty).
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b[\w.-]*(password|passwd|secret_key|api_key)[\w.-]*\s*[=:]\s*(?P<value>[^\s$\"'][^\s]*)")
_URI_PASSWORD = re.compile(r"://[^\s/:@]+:(?P<value>[^\s/@$]+)@")


def _env_lists(node):
    """Every Kubernetes-style `env` list in a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            yield from _env_lists(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_lists(value)


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_no_manifest_holds_a_literal_secret(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert not any(d.get("kind") == "Secret" for d in docs), "Secrets are created by the user, not shipped"
    for env in _env_lists(docs):
        for entry in env:
            if _SECRET_NAME.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), entry
    for text in _strings(docs):
        for pattern in (_SECRET_ASSIGNMENT, _URI_PASSWORD):
            match = pattern.search(text)
            assert match is None, f"{path.name}: literal secret {match.group(0)!r}"


def test_secret_patterns_catch_literals():
    assert _SECRET_ASSIGNMENT.search("MLFLOW_TRACKING_PASSWORD=hunter2")
    assert _SECRET_ASSIGNMENT.search("admin_password: hunter2")
    assert not _SECRET_ASSIGNMENT.search('MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"')
    assert _URI_PASSWORD.search("--mlflow-uri http://decrop:hunter2@decrop-mlflow:5000")
    assert not _URI_PASSWORD.search("--mlflow-uri http://decrop-mlflow:5000")


def test_mlflow_credentials_script_writes_a_private_env_file(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(CREDENTIALS_SH)], env=env, capture_output=True, text=True, check=True)
    path = tmp_path / ".decrop" / "mlflow-auth.env"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    values = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert tuple(values) == CREDENTIAL_KEYS  # the keys rayjob.yaml's secretKeyRefs and gpu-cluster.yaml use
    assert re.fullmatch(r"[0-9a-f]{48}", values["MLFLOW_TRACKING_PASSWORD"])
    assert values["MLFLOW_TRACKING_PASSWORD"] not in out.stdout + out.stderr, "the password is never printed"
    path.chmod(0o644)
    again = subprocess.run(["bash", str(CREDENTIALS_SH)], env=env, capture_output=True, text=True, check=True)
    assert "kept" in again.stderr and dict(line.split("=", 1) for line in path.read_text().splitlines()) == values
    assert path.stat().st_mode & 0o777 == 0o600


def test_runtime_env_keeps_the_upload_small():
    env = _load(RUNTIME_ENV)
    assert set(env) <= {"excludes", "env_vars", "pip", "py_modules", "config"}
    for pattern in (".venv", "mlflow.db", ".cluster", ".git", "*.pt", "runs", "results", "mlruns"):
        assert pattern in env["excludes"], pattern
    from tuning.sweep import RAY_ENV  # what a local sweep sets for itself, a cluster job must get too
    assert env["env_vars"].items() >= RAY_ENV.items()
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray wants string env values"


# --------------------------------------------------------------------------------------------- local.sh


def _code_lines(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def test_local_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(LOCAL_SH)], check=True)
    assert LOCAL_SH.stat().st_mode & 0o111, "executable"
    assert "set -euo pipefail" in LOCAL_SH.read_text()


def test_local_sh_binds_localhost_and_separates_nodes():
    code = _code_lines(LOCAL_SH)
    assert "0.0.0.0" not in code
    hosts = re.findall(r"--dashboard-host[= ](\S+)", code)
    assert hosts and set(hosts) == {"127.0.0.1"}
    assert "--host 127.0.0.1" in code and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in code
    temp_dirs = re.findall(r'--temp-dir="?\$(\w+)', code)
    assert sorted(temp_dirs) == ["HEAD_DIR", "WORKER_DIR"], "each node its own --temp-dir"
    head_dir, worker_dir = (re.search(rf"^{v}=(\S+)$", code, re.M)[1] for v in ("HEAD_DIR", "WORKER_DIR"))
    assert head_dir != worker_dir
    assert "ray stop" not in code, "`ray stop` would kill every Ray cluster on the machine"
    # Loopback head by default: the node address is 127.0.0.1 unless --with-worker asks for a second node.
    (head_start,) = [line for line in code.splitlines() if "setsid -w ray start --head" in line]
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=$((1 - loopback))" in head_start
    assert "start_head $((1 - with_worker))" in code
    assert "--include-dashboard=true" in code, "ray start itself waits for the dashboard"
    assert "umask 077 && ray get-auth-token --generate" in code, "the token file is private from the start"


def test_local_sh_usage(tmp_path):
    out = subprocess.run(["bash", str(LOCAL_SH), "--help"], capture_output=True, text=True, check=True)
    assert "up [--with-worker] [--with-mlflow]" in out.stdout
    bad = subprocess.run(["bash", str(LOCAL_SH), "sideways"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
