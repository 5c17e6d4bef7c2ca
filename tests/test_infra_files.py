"""Deployment files: they parse, agree with each other and with the code, and hold no credentials.

No cluster is needed: the YAML and JSON files are read as data, job configs go through
mcs_batch.config.load_config, and ray_cluster.yaml through Ray's own launcher schema. The Kubernetes
deployment is rendered as a site renders it: `kubectl kustomize` (kubectl's own kustomize) of the site
overlay with a filled site file, then the nightly RayJob as the CronJob's pod builds it (`kubectl create
-k` is that build plus a create); the rendered objects are checked against the Kubernetes JSON schemas
of kubernetes-validate, and KubeRay's objects (no package ships KubeRay's CRD schema) field by field,
their pod templates against the Kubernetes PodTemplateSpec schema.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CONFIGS = REPO / "jobs" / "configs"
KUBERAY = INFRA / "kuberay"
BASE = KUBERAY / "base"
SITE = KUBERAY / "site"
RAYJOB = BASE / "rayjob.yaml"
RAYCLUSTER = BASE / "standing" / "raycluster.yaml"

YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"), *CONFIGS.glob("*.yaml"), REPO / "ray_cluster.yaml"])
# Every file this suite guards against leaked credentials.
DEPLOY_FILES = sorted({*YAML_FILES, *(p for p in INFRA.rglob("*") if p.is_file())})
PAPER_CONFIGS = ["breast_us_tumour", "brain_mri_tumour", "lung_xray", "lung_ct"]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{_rel(path)}: expected one {kind}, found {len(found)}"
    return found[0]


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# ------------------------------------------------------------------------------------------------
# Parsing


def test_the_expected_files_exist():
    expected = [
        "infra/Dockerfile",
        "infra/README.md",
        "infra/kuberay/base/kustomization.yaml",
        "infra/kuberay/base/standing/raycluster.yaml",
        "infra/kuberay/base/rayjob.yaml",
        "infra/kuberay/base/cronjob.yaml",
        "infra/kuberay/base/wiring/replacements.yaml",
        "infra/kuberay/site/kustomization.yaml",
        "infra/kuberay/site/site.env",
        "infra/prometheus/prometheus.yml",
        "infra/grafana/mcs-batch-dashboard.json",
        "ray_cluster.yaml",
        *(f"jobs/configs/{name}.yaml" for name in [*PAPER_CONFIGS, "tiny_smoke"]),
    ]
    missing = [p for p in expected if not (REPO / p).is_file()]
    assert not missing


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses_into_mappings(path):
    docs = _docs(path)
    assert docs, f"{_rel(path)} is empty"
    if path.name == "replacements.yaml":  # kustomize's replacements file: a list of them
        (docs,) = docs
    assert all(isinstance(d, dict) for d in docs)


# ------------------------------------------------------------------------------------------------
# Job configs


SEGMENT_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("finetune", "train_weak")))
FINETUNE_CONFIGS = sorted(CONFIGS.glob("finetune*.yaml"))
WEAK_CONFIGS = sorted(CONFIGS.glob("train_weak*.yaml"))


@pytest.mark.parametrize("path", WEAK_CONFIGS, ids=lambda p: p.name)
def test_weak_training_config_loads_and_says_how_to_run_it(path):
    from mcs_batch.train.weak.config import load_weak_config

    cfg = load_weak_config(path, source="OUT", target="lesion", work="WORK")
    assert cfg.train.cycles >= 1 and cfg.train.keep_per_cycle >= 1
    assert "mcs-batch train-weak --from OUT" in path.read_text().split("\n\n", 1)[0]


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_finetune_config_loads_and_says_how_to_run_it(path):
    from mcs_batch.train.config import load_finetune_config

    load_finetune_config(path)
    assert "mcs-batch finetune-clip --config jobs/configs/" + path.name in path.read_text().split("\n\n", 1)[0]


@pytest.mark.parametrize("path", SEGMENT_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads_and_says_how_to_run_it(path):
    from mcs_batch.config import load_config

    cfg = load_config(path)
    assert cfg.targets and all(t.prompts for t in cfg.targets)
    header = path.read_text().split("\n\n", 1)[0]
    assert "mcs-batch segment INPUT --out OUT --config jobs/configs/" + path.name in header


@pytest.mark.parametrize(
    ("name", "target", "beta", "k_components", "ct_window"),
    [
        ("breast_us_tumour", "breast_tumour", 1.0, 1, None),
        ("brain_mri_tumour", "brain_tumour", 2.0, 1, None),
        ("lung_xray", "lungs", None, 2, None),
        ("lung_ct", "lungs", None, 2, "lung"),
    ],
)
def test_paper_configs_have_the_paper_settings(name, target, beta, k_components, ct_window):
    from mcs_batch.config import BIOMEDCLIP_HF, SAM_VIT_B_URL, load_config

    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.models.clip == BIOMEDCLIP_HF
    assert cfg.models.sam == SAM_VIT_B_URL
    assert cfg.models.sam_variant == "vit_b"
    assert [t.name for t in cfg.targets] == [target]
    (tgt,) = cfg.targets
    assert 2 <= len(tgt.prompts) <= 4
    assert tgt.coarse.k_components == k_components
    if beta is not None:
        assert cfg.m2ib.beta == beta
    if ct_window is not None:
        assert cfg.window.ct_window == ct_window
    assert "sam_sha256" in (CONFIGS / f"{name}.yaml").read_text()  # the pinning comment / key is there


def test_tiny_smoke_config_uses_tiny_models():
    from mcs_batch.config import load_config

    cfg = load_config(CONFIGS / "tiny_smoke.yaml")
    assert cfg.models.tiny
    assert cfg.m2ib.layer == 4


# ------------------------------------------------------------------------------------------------
# No credentials anywhere

_CREDENTIAL_PATTERNS = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    # A key followed on the same line by a value that is not a reference (${VAR}, <placeholder>, $(cmd)).
    (
        "aws_secret_access_key with a value",
        re.compile(r"aws_secret_access_key[\"']?[ \t]*[:=][ \t]*[\"']?[^\s\"'$<{(]", re.IGNORECASE),
    ),
    ("password with a literal value", re.compile(r"password[\"']?[ \t]*:[ \t]*[\"']?[^\s\"'$<{(]", re.IGNORECASE)),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
]


def _credentials_in(text: str) -> list[str]:
    return [what for what, pattern in _CREDENTIAL_PATTERNS if pattern.search(text)]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("key: AKIAABCDEFGHIJKLMNOP", ["AWS access key id"]),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", ["aws_secret_access_key with a value"]),
        ("AWS_SECRET_ACCESS_KEY: 'abc123'", ["aws_secret_access_key with a value"]),
        ("password: hunter2", ["password with a literal value"]),
        ("-----BEGIN RSA PRIVATE KEY-----", ["private key"]),
        ("aws_secret_access_key: ${AWS_SECRET}", []),
        ("password:\n  valueFrom: {secretKeyRef: {name: x, key: y}}", []),
        ("docker login --password-stdin", []),
        ("AWS_SECRET_ACCESS_KEY (from a Secret)", []),
    ],
)
def test_the_credential_check_finds_literals_only(text, found):
    assert _credentials_in(text) == found


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=_rel)
def test_no_credentials_in_deployment_files(path):
    assert _credentials_in(path.read_text()) == []


def test_no_kubernetes_secret_objects_or_literal_aws_keys_in_env():
    for path in KUBERAY.rglob("*.yaml"):
        for doc in _docs(path):
            assert not isinstance(doc, dict) or doc.get("kind") != "Secret", f"{_rel(path)}: Secrets come out of band"
    for env in _all_container_envs(_one(RAYCLUSTER, "RayCluster")["spec"]):
        for var in env:
            if var["name"].startswith("AWS_") and "KEY" in var["name"]:
                raise AssertionError(f"literal {var['name']} in the RayCluster env")


# ------------------------------------------------------------------------------------------------
# KubeRay


def _groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


def _all_container_envs(cluster_spec: dict) -> list[list[dict]]:
    return [c.get("env", []) for g in _groups(cluster_spec) for c in g["template"]["spec"]["containers"]]


def test_raycluster_has_a_taskless_head_and_autoscaling_cpu_and_gpu_groups():
    spec = _one(RAYCLUSTER, "RayCluster")["spec"]
    assert spec["rayVersion"] == version("ray")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(workers) == {"cpu-decode", "gpu"}
    for group in workers.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    gpu_limits = workers["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in workers["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for group in _groups(spec):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert any("persistentVolumeClaim" in v for v in pod["volumes"]), "weight cache volume"
        (container,) = pod["containers"]
        assert container["image"] == "SITE-IMAGE"  # the site file's IMAGE (see the site tests below)
        (init,) = pod["initContainers"]  # fills the model cache before Ray starts
        assert init["command"] == ["mcs-batch"] and init["args"][:2] == ["weights", "prefill"]
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in init["env"]
        assert [m["name"] for m in init["volumeMounts"]] == ["model-cache"]
        assert init["volumeMounts"][0]["mountPath"] == container["volumeMounts"][0]["mountPath"]
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
        assert {"secretRef": {"name": "mcs-batch-s3", "optional": True}} in container["envFrom"]


def test_rayjob_runs_an_existing_config_on_a_copy_of_the_raycluster():
    rayjob = _one(RAYJOB, "RayJob")["spec"]
    cluster = _one(RAYCLUSTER, "RayCluster")["spec"]
    assert rayjob["rayClusterSpec"] == cluster
    assert rayjob["shutdownAfterJobFinishes"] is True
    assert rayjob["ttlSecondsAfterFinished"] > 0
    assert "schedule" not in rayjob  # no KubeRay release has RayJob.spec.schedule

    argv = shlex.split(rayjob["entrypoint"])
    assert argv[:2] == ["python", "jobs/segment_cohort.py"]
    config = argv[argv.index("--config") + 1]
    assert config.startswith("jobs/configs/")
    assert (REPO / config).is_file(), f"the RayJob runs {config}, which does not exist"
    assert (REPO / "jobs" / "configs" / Path(config).name).resolve() == (REPO / config).resolve()
    assert yaml.safe_load(rayjob["runtimeEnvYAML"])["working_dir"] == "/app"  # where the Dockerfile puts jobs/


def test_cronjob_builds_the_rayjob_from_the_generated_configmap_and_the_nights_job_name():
    cron = _one(BASE / "cronjob.yaml", "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["create", "-k", "/manifests"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/manifests"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map, downward = volume["projected"]["sources"]
    assert downward["downwardAPI"]["items"] == [
        {"path": "job-name", "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}]  # fmt: skip
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == config_map["configMap"]["name"]
    assert generator["files"] == ["rayjob.yaml", "kustomization.yaml=nightly.kustomization.yaml",
                                  "wiring/replacements.yaml"]  # fmt: skip
    for resource in kustomization["resources"]:
        assert (BASE / resource).is_file()
    nightly = yaml.safe_load((BASE / "nightly.kustomization.yaml").read_text())
    assert nightly["resources"] == ["rayjob.yaml"]
    assert {"path": "replacements.yaml"} in nightly["replacements"]
    # No generateName (kustomize cannot build one): the name is the night's Job's, set by a replacement.
    assert "generateName" not in _one(RAYJOB, "RayJob")["metadata"]


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_ray_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"]
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert config["docker"]["image"].endswith(f"/mcs-batch:{_project_version()}")


# ------------------------------------------------------------------------------------------------
# Image, metrics, dashboard


def test_dockerfile_builds_a_non_root_image_from_the_pinned_constraints():
    text = (INFRA / "Dockerfile").read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert re.search(r"python:3\.11", text)
    assert "-c constraints.txt" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "COPY --chown=ray:ray jobs ./jobs" in text and "WORKDIR /app" in text
    assert re.search(r"^VOLUME", text, re.MULTILINE)
    ignore = [line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()]
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "the build context starts from nothing"
    assert not [r for r in rules if r.startswith("!") and ".venv" in r]


def test_prometheus_scrapes_the_ports_the_raycluster_declares():
    head = _one(RAYCLUSTER, "RayCluster")["spec"]["headGroupSpec"]
    declared = {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    scraped = set()
    for job in config["scrape_configs"]:
        for rule in job["relabel_configs"]:
            if rule.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]:
                scraped |= set(rule["regex"].split("|"))
    assert scraped == {"metrics", "as-metrics", "dash-metrics", "mcs-metrics"}
    assert scraped <= declared
    vm = yaml.safe_load((INFRA / "prometheus" / "prometheus-vm.yml").read_text())
    assert any("file_sd_configs" in job for job in vm["scrape_configs"])


def test_grafana_dashboard_shows_cases_stages_and_gpus():
    dashboard = json.loads((INFRA / "grafana" / "mcs-batch-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(exprs)
    joined = "\n".join(exprs)
    assert "mcs_batch_cases_total" in joined and "by (error_code)" in joined
    assert "mcs_batch_slices_total" in joined and "by (stage)" in joined
    assert "ray_node_gpus_utilization" in joined
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])


def test_the_rayjob_lets_its_model_actors_ask_for_every_gpu_the_cluster_may_launch():
    """The GPU workers start at zero: resources.gpus in the entrypoint is what makes the job ask for them."""
    rayjob = _one(RAYJOB, "RayJob")["spec"]
    argv = shlex.split(rayjob["entrypoint"])
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    gpu_group = next(g for g in rayjob["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    per_pod = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert int(sets["resources.gpus"]) == gpu_group["maxReplicas"] * per_pod
    from mcs_batch.config import load_config

    assert load_config(REPO / argv[argv.index("--config") + 1], overrides=[f"resources.gpus={sets['resources.gpus']}"])


def test_the_rayjob_leaves_a_site_only_its_inputs_and_outputs_and_serves_metrics_where_prometheus_looks(rendered):
    """The entrypoint is complete but for the two site slots (tests/test_jobs_api.py runs it), filled from
    the site file; the nightly job's metrics port is the head's declared "mcs-metrics" port and the
    launcher's scrape target."""
    from mcs_batch.config import load_config

    shipped = _one(RAYJOB, "RayJob")["spec"]["entrypoint"]
    assert shipped.split('"')[1::2] == ["SITE-ARCHIVE-URIS", "SITE-RESULTS-URI"]  # the replacements' slots
    argv = shlex.split(shipped)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert "SITE-" not in " ".join(a for a in sets if not a.startswith(("inputs.uris=", "outputs.uri=")))

    rayjob = rendered.nightly_rayjob["spec"]
    argv = shlex.split(rayjob["entrypoint"])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(REPO / argv[argv.index("--config") + 1], overrides=sets)
    assert list(cfg.inputs.uris) == EXAMPLE_ARCHIVES
    assert cfg.outputs.uri == EXAMPLE_SITE["RESULTS_URI"]
    head = rayjob["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (declared,) = [p["containerPort"] for p in head["ports"] if p["name"] == "mcs-metrics"]
    assert cfg.outputs.metrics_port == declared
    vm = yaml.safe_load((INFRA / "prometheus" / "prometheus-vm.yml").read_text())
    targets = [t for job in vm["scrape_configs"] for c in job.get("static_configs", []) for t in c["targets"]]
    assert f"localhost:{declared}" in targets


def test_alert_rules_cover_failure_progress_and_idle_gpus_with_metrics_that_exist():
    from mcs_batch.telemetry import JobMetrics

    families = JobMetrics().registry.collect()
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    exported |= {"ray_node_gpus_utilization"}  # Ray's node exporter (the dashboard's GPU panel reads it too)
    groups = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {"McsBatchJobFailed", "McsBatchFailureFractionHigh", "McsBatchNoProgress",
                          "McsBatchGpuIdleWhileWorkQueued"}  # fmt: skip
    for name, rule in rules.items():
        named = set(re.findall(r"\b(?:mcs_batch|ray)_[a-z_]+\b", rule["expr"]))
        assert named and named <= exported, (name, named - exported)
        assert rule["labels"]["severity"] in ("page", "warn") and rule["annotations"]["summary"]
    for config in ("prometheus.yml", "prometheus-vm.yml"):
        assert yaml.safe_load((INFRA / "prometheus" / config).read_text())["rule_files"] == ["alerts.yml"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `make sysdeps` installs it (Debian package prometheus)")
    checked = subprocess.run([promtool, "check", "rules", str(INFRA / "prometheus" / "alerts.yml")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0 and "SUCCESS: 4 rules found" in checked.stdout, checked.stdout + checked.stderr
    panels = json.loads((INFRA / "grafana" / "mcs-batch-dashboard.json").read_text())["panels"]
    joined = "\n".join(t["expr"] for p in panels for t in p["targets"])
    assert "mcs_batch_stage_seconds_total" in joined and "mcs_batch_cases_in_flight" in joined  # latency, queue


# ------------------------------------------------------------------------------------------------
# The site overlay: one file a site fills in, rendered with kubectl's kustomize

EXAMPLE_ARCHIVES = ["s3://example-archive/chest-ct/", "s3://example-archive-2/ct/"]
EXAMPLE_SITE = {  # what a site writes into infra/kuberay/site/site.env (the tests fill a copy)
    "IMAGE": "123456789012.dkr.ecr.eu-central-1.amazonaws.com/mcs-batch:0.1.0",
    "KUBECTL_IMAGE": "mirror.example.org/kubectl:v1.34.5",
    "AWS_REGION": "eu-central-1",
    "IAM_ROLE_ARN": "arn:aws:iam::123456789012:role/mcs-batch-example",
    "STORAGE_CLASS": "efs-example",
    "ARCHIVE_URIS": "[" + ", ".join(EXAMPLE_ARCHIVES) + "]",
    "RESULTS_URI": "s3://example-results/lung-ct",
    "WEIGHTS_URI": "s3://example-weights/models/",
    "SCHEDULE": "30 3 * * 1-5",
}
NIGHT_JOB = "mcs-batch-lung-ct-nightly-29412345"  # what the downward API gives the CronJob's pod
K8S_VERSIONS = ("1.27", "1.34")  # CronJob.timeZone and the job-name label need 1.27; the kubectl image is 1.34


def _site_values(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _replacements() -> list[dict]:
    return yaml.safe_load((BASE / "wiring" / "replacements.yaml").read_text())


def _kustomize(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER`: the objects `kubectl apply -k` / `kubectl create -k` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the kustomize overlay (kubectl ships kustomize v5)")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


class Rendered:
    """The site overlay's objects, and the RayJob the nightly CronJob's pod builds from them."""

    def __init__(self, objects: list[dict], nightly_rayjob: dict):
        self.objects = objects
        self.nightly_rayjob = nightly_rayjob

    def one(self, kind: str) -> dict:
        (found,) = [o for o in self.objects if o["kind"] == kind]
        return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Rendered:
    """The site overlay of a copy of infra/kuberay with the site file filled in (and the standing
    RayCluster listed), then the nightly RayJob built from the rendered ConfigMap as the CronJob's pod
    builds it (its files plus job-name, the projected volume's downward API item)."""
    root = tmp_path_factory.mktemp("kuberay") / "kuberay"
    shutil.copytree(KUBERAY, root)
    env = root / "site" / "site.env"
    filled = []
    for line in env.read_text().splitlines():
        key = line.split("=", 1)[0]
        filled.append(f"{key}={EXAMPLE_SITE[key]}" if "=" in line and not line.startswith("#") else line)
    env.write_text("\n".join(filled) + "\n")
    kustomization = root / "site" / "kustomization.yaml"
    text = kustomization.read_text()
    assert "  # - ../base/standing" in text
    kustomization.write_text(text.replace("  # - ../base/standing", "  - ../base/standing"))
    objects = _kustomize(root / "site")

    (nightly_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    night = root / "night"
    night.mkdir()
    for name, content in nightly_map["data"].items():
        (night / name).write_text(content)
    (night / "job-name").write_text(NIGHT_JOB)
    (rayjob,) = _kustomize(night)
    return Rendered(objects, rayjob)


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _pod_templates(ray_object: dict) -> list[dict]:
    spec = ray_object["spec"]["rayClusterSpec"] if ray_object["kind"] == "RayJob" else ray_object["spec"]
    return [g["template"] for g in _groups(spec)]


def test_the_site_fills_one_file_and_every_site_value_in_it_is_wired():
    assert sorted(p.name for p in SITE.iterdir()) == ["kustomization.yaml", "site.env"]
    shipped = _site_values(SITE / "site.env")
    sources = [r["source"] for r in _replacements()]
    assert {s["kind"] for s in sources} == {"ConfigMap"} and {s["name"] for s in sources} == {"mcs-batch-site"}
    wired = [s["fieldPath"].removeprefix("data.") for s in sources]
    assert sorted(wired) == sorted(shipped) == sorted(EXAMPLE_SITE)  # each value wired once, none missing
    overlay = yaml.safe_load((SITE / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base"] and overlay["components"] == ["../base/wiring"]
    site_map, nightly_merge = overlay["configMapGenerator"]
    assert site_map["envs"] == ["site.env"] and "literals" not in site_map
    assert site_map["options"]["annotations"] == {"config.kubernetes.io/local-config": "true"}
    assert nightly_merge == {"name": "mcs-batch-nightly-rayjob", "behavior": "merge", "files": ["site.env"]}
    assert set(overlay) == {"apiVersion", "kind", "resources", "configMapGenerator", "components"}  # no values


def test_the_shipped_site_file_holds_placeholders_a_site_cannot_miss():
    shipped = _site_values(SITE / "site.env")
    for key, value in shipped.items():
        if key not in ("KUBECTL_IMAGE", "SCHEDULE"):  # public defaults a site may keep
            assert "SITE-" in value, key
    assert shipped["IMAGE"].endswith(f"/mcs-batch:{_project_version()}")
    assert len(shipped["SCHEDULE"].split()) == 5
    assert shipped["ARCHIVE_URIS"].startswith("[") and shipped["ARCHIVE_URIS"].endswith("]")


def test_the_base_holds_no_site_value():
    """Every field a site value goes to holds a SITE- slot in the base; the values ops found in the old
    manifests are gone from every base file."""
    texts = {p: p.read_text() for p in BASE.rglob("*.yaml")}
    for path, text in texts.items():
        for old in ("registry.example.com", "us-west-2", "111122223333", "efs-sc", "SITE-ARCHIVE-BUCKET"):
            assert old not in text, f"{_rel(path)} still names {old}"
    rayjob, cluster = _one(RAYJOB, "RayJob"), _one(RAYCLUSTER, "RayCluster")
    for template in [*_pod_templates(rayjob), *_pod_templates(cluster)]:
        for container in [*template["spec"]["containers"], *template["spec"]["initContainers"]]:
            assert container["image"] == "SITE-IMAGE"
            assert {"name": "AWS_REGION", "value": "SITE-AWS-REGION"} in container["env"]
        assert template["spec"]["initContainers"][0]["args"][-2:] == ["--from", "SITE-WEIGHTS-URI"]
    prereqs = {d["kind"]: d for d in _docs(BASE / "prereqs.yaml")}
    assert prereqs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "SITE-IAM-ROLE-ARN"
    assert prereqs["PersistentVolumeClaim"]["spec"]["storageClassName"] == "SITE-STORAGE-CLASS"
    cron = _one(BASE / "cronjob.yaml", "CronJob")["spec"]
    assert cron["schedule"] == "SITE-SCHEDULE"
    assert cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] == "SITE-KUBECTL-IMAGE"
    slots = {s.rstrip("-") for text in texts.values() for s in re.findall(r"SITE-[A-Z-]+", text)}
    assert slots == {f"SITE-{key.replace('_', '-')}" for key in EXAMPLE_SITE}


def test_the_rendered_overlay_carries_every_site_value_everywhere(rendered):
    # The nightly ConfigMap carries the base's files, slots and all: the RayJob built from them is checked.
    objects = [o for o in rendered.objects if o["kind"] != "ConfigMap"]
    assert not [s for s in _strings([*objects, rendered.nightly_rayjob]) if "SITE-" in s], "a slot left unfilled"
    kinds = ["ConfigMap", "CronJob", "PersistentVolumeClaim", "RayCluster", "Role", "RoleBinding", "ServiceAccount"]
    assert sorted({o["kind"] for o in rendered.objects}) == kinds
    assert not [o for o in rendered.objects if o["metadata"]["name"] == "mcs-batch-site"]  # local-config only
    site = EXAMPLE_SITE
    for ray_object in (rendered.nightly_rayjob, rendered.one("RayCluster")):
        templates = _pod_templates(ray_object)
        assert len(templates) == 3  # head, cpu-decode, gpu
        for template in templates:
            pod = template["spec"]
            for container in [*pod["containers"], *pod["initContainers"]]:
                assert container["image"] == site["IMAGE"]
                assert {"name": "AWS_REGION", "value": site["AWS_REGION"]} in container["env"]
            (init,) = pod["initContainers"]
            assert init["args"] == ["weights", "prefill", "--config", "jobs/configs/lung_ct.yaml",
                                    "--from", site["WEIGHTS_URI"]]  # fmt: skip
    accounts = {o["metadata"]["name"]: o for o in rendered.objects if o["kind"] == "ServiceAccount"}
    assert accounts["mcs-batch-ray"]["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": site["IAM_ROLE_ARN"]}
    assert rendered.one("PersistentVolumeClaim")["spec"]["storageClassName"] == site["STORAGE_CLASS"]
    cron = rendered.one("CronJob")["spec"]
    assert cron["schedule"] == site["SCHEDULE"]
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == site["KUBECTL_IMAGE"]
    (projected,) = [v["projected"] for v in pod["volumes"] if "projected" in v]
    nightly_map = rendered.one("ConfigMap")
    assert projected["sources"][0]["configMap"]["name"] == nightly_map["metadata"]["name"]  # hash suffix followed
    assert nightly_map["metadata"]["name"].startswith("mcs-batch-nightly-rayjob-")
    assert sorted(nightly_map["data"]) == ["kustomization.yaml", "rayjob.yaml", "replacements.yaml", "site.env"]
    # The nightly RayJob: named after the night's Job, the site's inputs and outputs in its entrypoint.
    rayjob = rendered.nightly_rayjob
    assert rayjob["metadata"]["name"] == NIGHT_JOB and "generateName" not in rayjob["metadata"]
    assert rayjob["spec"]["entrypoint"].split('"')[1::2] == [site["ARCHIVE_URIS"], site["RESULTS_URI"]]
    # It is the base's RayJob with the site values and nothing else changed; its cluster is the standing one.
    base = _one(RAYJOB, "RayJob")["spec"]
    assert rayjob["spec"]["rayClusterSpec"] == rendered.one("RayCluster")["spec"]
    rest = ("entrypoint", "rayClusterSpec")
    assert {k: v for k, v in rayjob["spec"].items() if k not in rest} == {
        k: v for k, v in base.items() if k not in rest}  # fmt: skip


def test_the_init_step_and_the_job_use_one_config(rendered):
    rayjob = rendered.nightly_rayjob
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    for template in _pod_templates(rayjob):
        (init,) = template["spec"]["initContainers"]
        assert init["args"][init["args"].index("--config") + 1] == config
        assert init["workingDir"] == yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["working_dir"]


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_the_rendered_objects_pass_the_kubernetes_schemas(rendered, k8s):
    """Core objects as they are; KubeRay's pod templates as Kubernetes PodTemplates (strict schemas:
    an unknown or misspelt field fails)."""
    import kubernetes_validate

    core = [o for o in rendered.objects if o["apiVersion"] != "ray.io/v1"]
    assert len(core) == 7
    for obj in core:
        kubernetes_validate.validate(obj, k8s, strict=True)
    for ray_object in (rendered.nightly_rayjob, rendered.one("RayCluster")):
        for template in _pod_templates(ray_object):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
            kubernetes_validate.validate(wrapped, k8s, strict=True)


def test_the_schema_check_catches_a_misspelt_field(rendered):
    import kubernetes_validate

    cron = json.loads(json.dumps(rendered.one("CronJob")))
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(cron, K8S_VERSIONS[-1], strict=True)


# The KubeRay ray.io/v1 fields this project sets (KubeRay v1.5.1+), with their types. No package ships
# KubeRay's CRD schema, so these are checked here instead: a misspelt or misplaced field fails.
RAYJOB_SPEC = {"entrypoint": str, "runtimeEnvYAML": str, "submissionMode": str, "submitterConfig": dict,
               "backoffLimit": int, "activeDeadlineSeconds": int, "shutdownAfterJobFinishes": bool,
               "ttlSecondsAfterFinished": int, "rayClusterSpec": dict}  # fmt: skip
CLUSTER_SPEC = {"rayVersion": str, "authOptions": dict, "enableInTreeAutoscaling": bool, "autoscalerOptions": dict,
                "headGroupSpec": dict, "workerGroupSpecs": list}  # fmt: skip
HEAD_GROUP = {"serviceType": str, "rayStartParams": dict, "template": dict}
WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "rayStartParams": dict,
                "template": dict}  # fmt: skip
AUTOSCALER = {"version": str, "upscalingMode": str, "idleTimeoutSeconds": int, "resources": dict}


def _fields(where: str, value: dict, expected: dict) -> None:
    assert set(value) == set(expected), f"{where}: {sorted(set(value) ^ set(expected))}"
    for key, kind in expected.items():
        assert isinstance(value[key], kind) and not (kind is int and isinstance(value[key], bool)), f"{where}.{key}"


def test_the_kuberay_objects_use_kuberay_fields_with_their_types(rendered):
    rayjob = rendered.nightly_rayjob
    assert rayjob["apiVersion"] == rendered.one("RayCluster")["apiVersion"] == "ray.io/v1"
    _fields("RayJob.spec", rayjob["spec"], RAYJOB_SPEC)
    assert rayjob["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert set(rayjob["spec"]["submitterConfig"]) == {"backoffLimit"}
    for where, spec in (("RayJob.spec.rayClusterSpec", rayjob["spec"]["rayClusterSpec"]),
                        ("RayCluster.spec", rendered.one("RayCluster")["spec"])):  # fmt: skip
        _fields(where, spec, CLUSTER_SPEC)
        assert spec["authOptions"] == {"mode": "token"}
        _fields(f"{where}.autoscalerOptions", spec["autoscalerOptions"], AUTOSCALER)
        assert spec["autoscalerOptions"]["version"] == "v2"
        assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
        _fields(f"{where}.headGroupSpec", spec["headGroupSpec"], HEAD_GROUP)
        assert spec["headGroupSpec"]["serviceType"] in ("ClusterIP", "NodePort", "LoadBalancer")
        for group in spec["workerGroupSpecs"]:
            _fields(f"{where}.workerGroupSpecs[{group['groupName']}]", group, WORKER_GROUP)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for group in _groups(spec):  # map[string]string in the CRD
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in group["rayStartParams"].items())
