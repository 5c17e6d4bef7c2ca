"""Deployment files: they parse, agree with each other and with the code, and hold no credentials.

No cluster is needed: the YAML and JSON files are read as data, job configs go through
mcs_batch.config.load_config, and ray_cluster.yaml through Ray's own launcher schema.
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
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/rayjob.yaml",
        "infra/kuberay/cronjob.yaml",
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
    for path in KUBERAY.glob("*.yaml"):
        for doc in _docs(path):
            assert doc.get("kind") != "Secret", f"{_rel(path)}: Secrets are created out of band"
    for env in _all_container_envs(_one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]):
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
    spec = _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]
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
        assert container["image"].endswith(f"/mcs-batch:{_project_version()}")
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
        assert {"secretRef": {"name": "mcs-batch-s3", "optional": True}} in container["envFrom"]


def test_rayjob_runs_an_existing_config_on_a_copy_of_the_raycluster():
    rayjob = _one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    cluster = _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]
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


def test_cronjob_creates_the_rayjob_manifest_from_the_generated_configmap():
    cron = _one(KUBERAY / "cronjob.yaml", "CronJob")["spec"]
    assert len(cron["schedule"].split()) == 5
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["create", "-f", "/manifests/rayjob.yaml"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == volume["configMap"]["name"]
    assert generator["files"] == ["rayjob.yaml"]
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file()
    # kubectl create (not apply) with a generated name: one RayJob per night.
    assert "generateName" in _one(KUBERAY / "rayjob.yaml", "RayJob")["metadata"]


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
    head = _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]["headGroupSpec"]
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
    rayjob = _one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(rayjob["entrypoint"])
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    gpu_group = next(g for g in rayjob["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    per_pod = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert int(sets["resources.gpus"]) == gpu_group["maxReplicas"] * per_pod
    from mcs_batch.config import load_config

    assert load_config(REPO / argv[argv.index("--config") + 1], overrides=[f"resources.gpus={sets['resources.gpus']}"])


def test_the_rayjob_leaves_a_site_only_its_inputs_and_outputs_and_serves_metrics_where_prometheus_looks():
    """The entrypoint is complete but for the SITE placeholders (tests/test_jobs_api.py runs it), and the
    nightly job's metrics port is the head's declared "mcs-metrics" port and the launcher's scrape target."""
    from mcs_batch.config import load_config

    rayjob = _one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(rayjob["entrypoint"])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(REPO / argv[argv.index("--config") + 1], overrides=sets)
    assert cfg.inputs.uris and all("SITE-" in uri for uri in cfg.inputs.uris)
    assert "SITE-" in cfg.outputs.uri
    assert "SITE-" not in " ".join(a for a in sets if not a.startswith(("inputs.uris=", "outputs.uri=")))
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
