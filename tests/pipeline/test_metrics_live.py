"""Live metrics: a scrape during a job sees the counters rise before the end, and the final values stay
scrapeable for outputs.metrics_linger_seconds after it."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcs_batch.pipeline import run_job
from tests.pipeline.test_job import QUIET, job, small_cohort

pytestmark = pytest.mark.usefixtures("ray_local")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float] | None:
    """Sample name -> value summed over labels; None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def test_counters_rise_during_the_job_and_the_final_values_linger(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=8)
    (cohort / "ct").rename(tmp_path / "ct-not-used")
    port = free_port()
    cfg = job([cohort], tmp_path / "out", tmp_path, "outputs.catalog_flush_cases=1", f"outputs.metrics_port={port}",
              "outputs.metrics_linger_seconds=4", "resources.block_rows=1", "resources.saliency_batch=1",
              "resources.sam_batch=1")  # fmt: skip
    done = threading.Event()
    result: dict = {}
    thread = threading.Thread(target=lambda: (result.update(summary=run_job(cfg, **QUIET)), done.set()), daemon=True)
    thread.start()
    during = []
    while not done.is_set():
        values = scrape(port)
        if values is not None:
            during.append(values)
        time.sleep(0.2)
    thread.join()
    assert result["summary"].by_status == {"ok": 8}
    running = [v for v in during if v.get("mcs_batch_job_running") == 1]
    assert running, "the job served no metrics while it ran"
    mid = [v.get("mcs_batch_cases_total", 0) for v in running]
    assert any(0 < n < 8 for n in mid), f"no scrape saw the count rise mid-run: {sorted(set(mid))}"

    final = scrape(port)  # the job has returned: the final values are still served
    assert final is not None and final["mcs_batch_cases_total"] == 8 and final["mcs_batch_job_running"] == 0
    assert final["mcs_batch_job_failed"] == 0 and final["mcs_batch_slices_total"] == 3 * 8  # 3 stages x 8 slices
    assert final["mcs_batch_last_commit_timestamp_seconds"] > 0
    deadline = time.monotonic() + 30
    while scrape(port) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert scrape(port) is None  # and the port is free again after the linger
