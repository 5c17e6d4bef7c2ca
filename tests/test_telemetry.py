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


def test_queue_gauges_follow_planning_commits_and_stopped_attempts():
    port = free_port()
    metrics = JobMetrics(port)
    try:
        before = scrape_text(port)
        metrics.planned(7)  # the grouper handed on 7 cases; nothing committed yet
        planned = scrape_text(port)
        metrics.committed(2, failed=1)
        committed = scrape_text(port)
        metrics.planned(9)
        metrics.attempt_stopped()  # 7 planned and not committed are dropped, planned again by the next attempt
        stopped = scrape_text(port)
        metrics.planned(12)  # ... which planned 3 of them again
        replanned = scrape_text(port)
    finally:
        metrics.close()
    assert sample(before, "mcs_batch_cases_in_flight") == 0
    assert sample(before, "mcs_batch_last_commit_timestamp_seconds") == 0  # no commit yet
    assert sample(before, "mcs_batch_job_start_timestamp_seconds") > 0
    assert sample(planned, "mcs_batch_cases_planned") == 7 and sample(planned, "mcs_batch_cases_in_flight") == 7
    assert sample(committed, "mcs_batch_cases_committed") == 2 and sample(committed, "mcs_batch_cases_failed") == 1
    assert sample(committed, "mcs_batch_cases_in_flight") == 5
    assert sample(committed, "mcs_batch_last_commit_timestamp_seconds") >= sample(
        before, "mcs_batch_job_start_timestamp_seconds"
    )
    assert sample(stopped, "mcs_batch_cases_in_flight") == 0
    assert sample(replanned, "mcs_batch_cases_planned") == 12 and sample(replanned, "mcs_batch_cases_in_flight") == 3


def scrape_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def sample(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def test_a_sharded_jobs_endpoint_serves_the_sum_of_its_shards_and_drops_a_dead_ones_queue():
    port = free_port()
    parent, shard_a, shard_b = JobMetrics(port), JobMetrics(), JobMetrics()
    try:
        shard_a.planned(5)
        shard_a.case("lungs", "ok", None)
        shard_a.slices_done(3, {"load": 1.5})
        shard_a.committed(1, 0)
        shard_b.planned(4)
        for _ in range(2):  # polled twice: nothing counted twice
            parent.absorb("run-a", shard_a.snapshot())
            parent.absorb("run-b", shard_b.snapshot())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'mcs_batch_cases_total{error_code="",status="ok",target="lungs"} 1.0' in text
        assert 'mcs_batch_slices_total{stage="load"} 3.0' in text
        assert "mcs_batch_cases_planned 9.0" in text and "mcs_batch_cases_in_flight 8.0" in text
        parent.absorb("run-b", None, ended=True)  # shard b's driver died: its restart plans its cases again
        shard_b2 = JobMetrics()
        shard_b2.planned(4)
        shard_b2.case("lungs", "ok", None)
        shard_b2.committed(1, 0)
        parent.absorb("run-b-r1", shard_b2.snapshot())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'mcs_batch_cases_total{error_code="",status="ok",target="lungs"} 2.0' in text
        assert "mcs_batch_cases_committed 2.0" in text and "mcs_batch_cases_in_flight 7.0" in text  # 4 + 3
        last = next(line for line in text.splitlines() if line.startswith("mcs_batch_last_commit_timestamp_seconds "))
        assert float(last.split()[1]) > 0
    finally:
        parent.close()
