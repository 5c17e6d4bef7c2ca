"""A job stuck before its first commit pages someone: a real job whose model actors never start (each
asks for a GPU the local cluster does not have) serves its planned cases as in flight, and promtool
evaluates infra/prometheus/alerts.yml on series made of what the job served, extrapolated over the
rules' windows: McsBatchNoProgress and McsBatchGpuIdleWhileWorkQueued fire for it, and neither fires
for a healthy job that commits every minute with busy GPUs."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from mcs_batch.pipeline import run_job
from tests.pipeline.test_job import QUIET, job, small_cohort
from tests.pipeline.test_metrics_live import free_port, scrape

pytestmark = pytest.mark.usefixtures("ray_local")
ALERTS = Path(__file__).resolve().parents[2] / "infra" / "prometheus" / "alerts.yml"
CASES = 7  # small_cohort: 6 images and a 5-slice series
SCRAPES = 5  # scrapes of the stuck job, 1 s apart, once it has planned every case
START_AT = 600  # promtool's clock: the job starts 10 minutes in (the rules must count from the start)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make sysdeps` installs it (Debian package prometheus)")
    return path


def stuck_job_scrapes(tmp_path: Path) -> tuple[list[dict[str, float]], object]:
    """Scrapes of a real job whose model actors never start, taken once its cases are planned; then
    the job is stopped through run_job's stop event. Returns (scrapes, the job's summary)."""
    cohort = small_cohort(tmp_path / "in", n_images=6)
    port = free_port()
    # on CPU one actor pool runs both models (resources.models_together: auto): each of its actors asks for a GPU
    settings = (f"outputs.metrics_port={port}", "outputs.metrics_linger_seconds=0", "resources.sam_gpus=1")
    cfg = job([cohort], tmp_path / "out", tmp_path, *settings)
    stop, result = threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(summary=run_job(cfg, stop=stop, **QUIET)), daemon=True)
    thread.start()
    scrapes: list[dict[str, float]] = []
    deadline = time.monotonic() + 90
    try:
        while len(scrapes) < SCRAPES and time.monotonic() < deadline and thread.is_alive():
            values = scrape(port)
            if values and values.get("mcs_batch_cases_planned") == CASES:  # the series comes after the images
                scrapes.append(values)
                time.sleep(1.0)
            else:
                time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not thread.is_alive(), "the stopped job did not end"
    rows_threads = [t for t in threading.enumerate() if t.name == "mcs-batch-rows"]
    assert not rows_threads, "the stopped job's Ray Data iteration is still running"
    return scrapes, result.get("summary")


def test_a_job_stuck_before_its_first_commit_pages(tmp_path: Path):
    scrapes, summary = stuck_job_scrapes(tmp_path)
    assert len(scrapes) == SCRAPES, f"the job never served planned cases: {scrapes}"
    for values in scrapes:  # what ops see while the model actors wait for a GPU
        assert values["mcs_batch_job_running"] == 1 and values["mcs_batch_cases_planned"] == CASES
        assert values["mcs_batch_cases_in_flight"] == CASES and values["mcs_batch_cases_committed"] == 0
        assert values["mcs_batch_last_commit_timestamp_seconds"] == 0  # nothing committed yet
        assert values["mcs_batch_job_start_timestamp_seconds"] > time.time() - 600
    assert summary is not None and "stopped" in summary.aborted and summary.cases == 0

    served = scrapes[-1]
    started = served["mcs_batch_job_start_timestamp_seconds"]
    # promtool's clock starts at 0: the job's own timestamps are moved so that it starts at START_AT
    shift = started - START_AT
    n = 60 * 4  # samples every 15 s for an hour after the start

    def series(value: float) -> str:
        return f"_x{START_AT // 15} {value:g}x{n}"  # absent before the job, then what it serves

    last_commit = served["mcs_batch_last_commit_timestamp_seconds"]  # 0: none yet, served as it is
    stuck = [
        {"series": "mcs_batch_job_running", "values": series(served["mcs_batch_job_running"])},
        {"series": "mcs_batch_cases_in_flight", "values": series(served["mcs_batch_cases_in_flight"])},
        {"series": "mcs_batch_last_commit_timestamp_seconds", "values": series(last_commit and last_commit - shift)},
        {"series": "mcs_batch_job_start_timestamp_seconds", "values": series(started - shift)},
        {"series": 'ray_node_gpus_utilization{GpuIndex="0"}', "values": series(0)},
    ]
    healthy = [  # the same queue, but a commit every 15 s and busy GPUs
        {"series": "mcs_batch_job_running", "values": series(1)},
        {"series": "mcs_batch_cases_in_flight", "values": series(served["mcs_batch_cases_in_flight"])},
        {"series": "mcs_batch_last_commit_timestamp_seconds", "values": f"_x{START_AT // 15} {START_AT}+15x{n}"},
        {"series": "mcs_batch_job_start_timestamp_seconds", "values": series(START_AT)},
        {"series": 'ray_node_gpus_utilization{GpuIndex="0"}', "values": series(85)},
    ]
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}

    def firing(name: str) -> list[dict]:
        return [{"exp_labels": rules[name]["labels"], "exp_annotations": rules[name]["annotations"]}]

    def at(minutes_after_start: int) -> str:
        return f"{START_AT // 60 + minutes_after_start}m"

    no_progress, gpu_idle = "McsBatchNoProgress", "McsBatchGpuIdleWhileWorkQueued"
    stuck_checks = [  # NoProgress: 20 minutes after the start; GpuIdle: its `for: 15m`
        (19, no_progress, []), (21, no_progress, firing(no_progress)),
        (14, gpu_idle, []), (16, gpu_idle, firing(gpu_idle)),
    ]  # fmt: skip
    healthy_checks = [(m, name, []) for m in (21, 40, 59) for name in (no_progress, gpu_idle)]

    def rule_tests(checks: list[tuple]) -> list[dict]:
        return [{"eval_time": at(m), "alertname": name, "exp_alerts": alerts} for m, name, alerts in checks]

    tests = [
        {"interval": "15s", "input_series": stuck, "alert_rule_test": rule_tests(stuck_checks)},
        {"interval": "15s", "input_series": healthy, "alert_rule_test": rule_tests(healthy_checks)},
    ]
    rules_test = tmp_path / "alerts_test.yml"
    rules_test.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "15s", "tests": tests}))
    done = subprocess.run([promtool(), "test", "rules", str(rules_test)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == 1, done.stdout
