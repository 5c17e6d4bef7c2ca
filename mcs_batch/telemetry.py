"""Prometheus metrics of a job, served by the driver (prometheus-client) when a port is configured.

    mcs_batch_cases_total{target, status, error_code}   (case, target) rows in this run's commits, counted
                                                         when the commit lands
    mcs_batch_slices_total{stage}                        slices through a stage, counted when their case is
                                                         assembled; stage: load (decode, window), saliency
                                                         (M2IB maps), sam (SAM masks). The prompts are made
                                                         from the maps in the saliency actor and not timed
    mcs_batch_stage_seconds_total{stage}                 seconds spent in a stage, summed over those slices
    mcs_batch_job_running                                1 while the job runs, 0 once it has ended
    mcs_batch_job_failed                                 1 once the job ended failed or aborted
    mcs_batch_job_start_timestamp_seconds                when the job started (its metrics were set up)
    mcs_batch_cases_planned                              cases the grouper has handed on this run, to be
                                                         segmented or recorded (cases committed before and
                                                         skipped are not planned; a case planned again after
                                                         lost nodes counts again)
    mcs_batch_cases_committed                            cases whose rows this run has committed
    mcs_batch_cases_failed                               of those, cases with a failed row
    mcs_batch_cases_in_flight                            cases planned and not yet committed: planned -
                                                         committed - what stopped attempts dropped (planned
                                                         again by the next); 0 once the job has ended
    mcs_batch_last_commit_timestamp_seconds              when the last commit was published; 0 before the
                                                         run's first commit (alerts on a job that never
                                                         committed read the start timestamp)

The queue gauges move while the job runs: planned (and so in flight) as the grouper releases cases
(the driver reads the job board's count every pipeline/job.POLL_SECONDS), committed, failed and in
flight at every commit. So a job stuck before its first commit (model actors that never start) shows
its cases in flight, and infra/prometheus/alerts.yml's McsBatchNoProgress pages 20 minutes after its
start. After the job the server keeps serving the final values for outputs.metrics_linger_seconds, so
that a scrape every 15 s still sees how the job ended (`wait_for_lingering` holds a command-line
process that long). The Grafana dashboard in infra/grafana and the alert rules in
infra/prometheus/alerts.yml read these names.

A job with shard drivers (pipeline/shards.py) serves one set of these from its parent process: every
few seconds the parent takes each shard run's counts (`snapshot`) and sums them (`absorb`), so the
names mean the same for the whole job, whatever the number of drivers.
"""

from __future__ import annotations

import json
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from mcs_batch.errors import ConfigError

STAGES = ("load", "saliency", "sam")
_NOTHING = {"planned": 0, "committed": 0, "failed": 0, "dropped": 0, "last_commit": 0.0, "cases": {}, "slices": {},
            "stage_seconds": {}}  # a shard run not heard from yet  # fmt: skip


class JobMetrics:
    """Counters for one job; a private registry, so several jobs in one process do not collide."""

    def __init__(self, port: int = 0, linger_seconds: float = 0.0):
        self.linger_seconds = float(linger_seconds)
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
        self.running = Gauge("mcs_batch_job_running", "1 while the job runs", registry=self.registry)
        self.failed = Gauge("mcs_batch_job_failed", "1 once the job ended failed or aborted", registry=self.registry)
        self.started = Gauge("mcs_batch_job_start_timestamp_seconds", "when the job started", registry=self.registry)
        self.cases_planned = Gauge("mcs_batch_cases_planned", "cases the grouper has handed on this run",
                                   registry=self.registry)  # fmt: skip
        self.cases_committed = Gauge("mcs_batch_cases_committed", "cases whose rows this run has committed",
                                     registry=self.registry)  # fmt: skip
        self.cases_failed = Gauge("mcs_batch_cases_failed", "committed cases with a failed row", registry=self.registry)
        self.in_flight = Gauge("mcs_batch_cases_in_flight", "cases planned, not yet committed", registry=self.registry)
        self.last_commit = Gauge(
            "mcs_batch_last_commit_timestamp_seconds", "when the last commit was published (0: none yet)",
            registry=self.registry,
        )  # fmt: skip
        self._planned = self._committed = self._failed = self._dropped = 0  # cases, this run
        self._last_commit = 0.0
        self._shards: dict[str, dict] = {}  # shard run -> its last snapshot (a sharded job's parent)
        self.started.set(time.time())
        self.running.set(1)
        self.server = None
        if port:
            try:
                self.server, _ = start_http_server(port, registry=self.registry)
            except OSError as e:  # in use, or not allowed: the job has not started anything yet
                raise ConfigError(
                    f"outputs.metrics_port: cannot serve metrics on port {port} ({e.strerror or e})"
                ) from e

    def case(self, target: str, status: str, error_code: str | None, n: int = 1) -> None:
        """n committed (case, target) rows of this target, status and error code."""
        self.cases.labels(target=target, status=status, error_code=error_code or "").inc(n)

    def slices_done(self, n: int, seconds_by_stage: dict[str, float]) -> None:
        """n slices of a case went through every stage, spending these seconds in each (summed)."""
        for stage, seconds in seconds_by_stage.items():
            self.slices.labels(stage=stage).inc(n)
            self.stage_seconds.labels(stage=stage).inc(max(float(seconds), 0.0))

    def planned(self, cases: int) -> None:
        """The grouper has handed on `cases` cases this run so far (the job board's running total)."""
        self._planned = max(self._planned, int(cases))
        self._queue()

    def committed(self, cases: int, failed: int) -> None:
        """A commit landed with the rows of `cases` cases, `failed` of them with a failed row."""
        self._committed += int(cases)
        self._failed += int(failed)
        self._last_commit = time.time()
        self.last_commit.set(self._last_commit)
        self._queue()

    def attempt_stopped(self) -> None:
        """An attempt stopped (lost nodes) after committing what was assembled: the cases still in
        flight are dropped, and the next attempt's grouper plans them again."""
        self._dropped = self._planned - self._committed
        self._queue()

    def queue(self) -> dict[str, int]:
        """The queue in cases: planned, committed, failed, in flight (as the gauges serve them)."""
        in_flight = max(0, self._planned - self._committed - self._dropped)
        return {"planned": self._planned, "committed": self._committed, "failed": self._failed,
                "in_flight": in_flight}  # fmt: skip

    def _queue(self) -> None:
        queue = self.queue()
        self.cases_planned.set(queue["planned"])
        self.cases_committed.set(queue["committed"])
        self.cases_failed.set(queue["failed"])
        # max: the board's count may trail a commit of cases it handed straight to the driver
        self.in_flight.set(queue["in_flight"])

    # -- sharded drivers (pipeline/shards.py): each shard's metrics, summed into the parent's ----------
    def snapshot(self) -> dict:
        """This job's counts, for a parent summing its shards' (absorb): plain numbers, no registry."""

        def samples(counter) -> dict[str, float]:
            return {json.dumps(s.labels, sort_keys=True): s.value for m in counter.collect() for s in m.samples
                    if s.name.endswith("_total")}  # fmt: skip

        return {"planned": self._planned, "committed": self._committed, "failed": self._failed,
                "dropped": self._dropped, "last_commit": self._last_commit,
                "cases": samples(self.cases), "slices": samples(self.slices),
                "stage_seconds": samples(self.stage_seconds)}  # fmt: skip

    def absorb(self, key: str, snapshot: dict | None, *, ended: bool = False) -> None:
        """A shard run's snapshot (its latest; None: the last one absorbed): counters grow by what it
        added since its last one, the queue is the sum over shard runs. ended: the run stopped for good
        (its driver died): what it had in flight is dropped (its restart plans it again), as after a
        stopped attempt."""
        before = self._shards.get(key) or _NOTHING
        snapshot = dict(snapshot or before)
        if ended:
            snapshot["dropped"] = snapshot["planned"] - snapshot["committed"]
        self._shards[key] = snapshot
        for name, counter in (("cases", self.cases), ("slices", self.slices), ("stage_seconds", self.stage_seconds)):
            for labels, value in snapshot[name].items():
                grown = value - before[name].get(labels, 0.0)
                if grown > 0:
                    counter.labels(**json.loads(labels)).inc(grown)
        runs = self._shards.values()
        self._planned, self._committed = sum(r["planned"] for r in runs), sum(r["committed"] for r in runs)
        self._failed, self._dropped = sum(r["failed"] for r in runs), sum(r["dropped"] for r in runs)
        self._last_commit = max(r["last_commit"] for r in runs)
        self.last_commit.set(self._last_commit)
        self._queue()

    def close(self, failed: bool = False) -> None:
        """The job ended: final values set; the server stops now, or after the linger (in a thread)."""
        self.running.set(0)
        self.failed.set(1 if failed else 0)
        self.in_flight.set(0)
        server, self.server = self.server, None
        if server is None:
            return
        if self.linger_seconds <= 0:
            server.shutdown()
            return
        timer = threading.Timer(self.linger_seconds, server.shutdown)
        timer.daemon = True
        timer.start()
        _LINGERING.append(timer)


_LINGERING: list[threading.Timer] = []


def wait_for_lingering() -> None:
    """Block until every metrics server of this process has served its final values for its linger
    (a command-line run; a long-lived process need not call it)."""
    while _LINGERING:
        timer = _LINGERING.pop()
        timer.join()
