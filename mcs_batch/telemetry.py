"""Prometheus metrics of a job, served by the driver (prometheus-client) when a port is configured.

    mcs_batch_cases_total{target, status, error_code}   (case, target) rows committed
    mcs_batch_slices_total{stage}                        slices through load / saliency / sam
    mcs_batch_stage_seconds_total{stage}                 time spent per stage, summed over slices
The Grafana dashboard in infra/grafana reads these names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server

from mcs_batch.errors import ConfigError

STAGES = ("load", "saliency", "sam")


class JobMetrics:
    """Counters for one job; a private registry, so several jobs in one process do not collide."""

    def __init__(self, port: int = 0):
        self.registry = CollectorRegistry()
        self.cases = Counter(
            "mcs_batch_cases",
            "(case, target) rows committed",
            ["target", "status", "error_code"],
            registry=self.registry,
        )
        self.slices = Counter("mcs_batch_slices", "slices through a pipeline stage", ["stage"], registry=self.registry)
        self.stage_seconds = Counter(
            "mcs_batch_stage_seconds", "seconds spent in a stage, summed over slices", ["stage"], registry=self.registry
        )
        self.server = None
        if port:
            try:
                self.server, _ = start_http_server(port, registry=self.registry)
            except OSError as e:  # in use, or not allowed: the job has not started anything yet
                raise ConfigError(
                    f"outputs.metrics_port: cannot serve metrics on port {port} ({e.strerror or e})"
                ) from e

    def case(self, target: str, status: str, error_code: str | None) -> None:
        self.cases.labels(target=target, status=status, error_code=error_code or "").inc()

    def slices_done(self, n: int, seconds_by_stage: dict[str, float]) -> None:
        """n slices of a case went through every stage, spending these seconds in each (summed)."""
        for stage, seconds in seconds_by_stage.items():
            self.slices.labels(stage=stage).inc(n)
            self.stage_seconds.labels(stage=stage).inc(max(float(seconds), 0.0))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
