"""The job's Prometheus endpoint serves the names the Grafana dashboard reads."""

from __future__ import annotations

import socket
import urllib.request

from mcs_batch.telemetry import JobMetrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_counts_cases_and_slices():
    port = free_port()
    metrics = JobMetrics(port)
    try:
        metrics.case("lungs", "ok", None)
        metrics.case("lungs", "failed", "truncated")
        metrics.slices_done(2, {"load": 0.75, "saliency": 4.0, "sam": 2.0})  # one case of two slices
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    assert 'mcs_batch_cases_total{error_code="",status="ok",target="lungs"} 1.0' in text
    assert 'mcs_batch_cases_total{error_code="truncated",status="failed",target="lungs"} 1.0' in text
    assert 'mcs_batch_slices_total{stage="saliency"} 2.0' in text
    assert 'mcs_batch_stage_seconds_total{stage="load"} 0.75' in text


def test_no_port_no_server():
    metrics = JobMetrics(0)
    assert metrics.server is None
    metrics.case("t", "ok", None)  # counting still works
    metrics.close()
