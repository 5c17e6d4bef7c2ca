"""The driver's side of the job: count slices per case, send finished cases to be assembled in the
cluster, commit what comes back.

Rows reaching the driver are small: one per case (its record, how many slices to expect), one per
staging part (case id, slices in it, its URI), and one per block whose parts task assembled the cases
wholly inside it (their rows, as an assembly task returns them: committed like those). When a case's
slices are all in, it waits in `ready` until a few cases can go to one assembly task
(stages/assemble.assemble_cases); results are buffered and committed every
`outputs.catalog_flush_cases` cases, `catalog_flush_slices` slice rows or `catalog_flush_seconds`,
each flush one commit of the Delta tables (mcs_batch.outputs.catalog). The driver holds only cases in
flight: no mask, no image, no slice row as Python objects (slice rows come back as Arrow tables and go
to Parquet as they are).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog, CommitWindow
from mcs_batch.outputs.lease import heartbeats
from mcs_batch.outputs.schema import SLICES_SCHEMA
from mcs_batch.pipeline.resources import Resolved
from mcs_batch.records import Status
from mcs_batch.stages.assemble import STAGE_TIMES, assemble_cases, assemble_isolated
from mcs_batch.telemetry import JobMetrics

ASSEMBLE_SLICES = 256  # slices per assembly task (several small cases share one task) ...
ASSEMBLE_CASES = 32  # ... or at most this many cases ...
ASSEMBLE_WAIT_S = 0.5  # ... or whatever is ready after this long


class JobAborted(RuntimeError):
    """The failure budget was exceeded: the job stops early (what was finished is committed)."""


@dataclass
class _Pending:
    case_json: str | None = None
    expected: int | None = None
    got: int = 0
    parts: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.case_json is not None and self.got == self.expected


@dataclass
class JobSummary:
    run_id: str
    out: str
    config_hash: str
    tiny_models: bool
    by_status: dict[str, int] = field(default_factory=dict)  # per (case, target) row
    by_error: dict[str, int] = field(default_factory=dict)
    cases: int = 0
    slices: int = 0
    seconds: float = 0.0
    skipped_committed: int = 0
    redone: int = 0  # committed pairs redone: retried failures, grown series
    grown_series: int = 0  # committed series found with another instance set, redone
    replaced: int = 0  # committed rows this run replaced (retried failures, grown series)
    dropped: int = 0  # pairs another job committed first: this run's rows for them were dropped
    aborted: str = ""
    run_uri: str = ""

    def lines(self) -> list[str]:
        def fmt(counts):
            return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"

        rate = self.slices / self.seconds if self.seconds else 0.0
        lines = []
        if self.tiny_models:
            lines.append("NOTE: TINY random models were used: every mask in this run is meaningless")
        lines += [
            f"run {self.run_id}: {self.cases} case(s), {self.slices} slice(s) "
            f"in {self.seconds:.1f} s ({rate:.2f} slices/s)",
            f"  (case, target) rows: {fmt(self.by_status)}",
            f"  errors:              {fmt(self.by_error)}",
            f"  already committed, skipped: {self.skipped_committed} case(s); grown series redone: "
            f"{self.grown_series}; rows replaced: {self.replaced}; committed first by another job: {self.dropped}",
            f"  outputs: {self.out}  (masks/, catalog/cases, catalog/slices, {self.run_uri})",
            f'  example: mcs-batch query {self.out} "SELECT status, error_code, count(*) FROM cases GROUP BY 1, 2"',
        ]
        if self.aborted:
            lines.insert(0, f"ABORTED: {self.aborted}")
        return lines


class CaseWriter:
    """Counts, dispatches assembly, commits. Single-threaded: the job's loop calls every method."""

    def __init__(
        self,
        catalog: Catalog,
        cfg: JobConfig,
        run_id: str,
        summary: JobSummary,
        metrics: JobMetrics,
        *,
        storage: StorageOptions | None,
        resources: Resolved,
        fenced: Callable[[], str | None] = lambda: None,
    ):
        import ray

        self.catalog, self.cfg, self.run_id, self.summary, self.metrics = catalog, cfg, run_id, summary, metrics
        self.storage, self.fenced = storage, fenced  # fenced: why this run must not commit (outputs/lease.py)
        self.pending: dict[str, _Pending] = {}
        self.ready: list[dict] = []
        self.ready_slices = 0
        self.ready_since = 0.0
        self.inflight: list = []
        self.max_inflight = max(2, int(2 * resources.cluster.get("cpus", 2)))
        self._task = ray.remote(assemble_cases).options(num_cpus=resources.assemble_cpus, max_retries=3)
        self._cfg_ref = ray.put(cfg)
        # made before any grouper reads the committed pairs: the commits' merges read only the rows of
        # runs started since or running now (and the rows they name), not the whole catalog
        self.window = CommitWindow.from_start(time.time(), heartbeats(catalog))
        self.case_rows: list[dict] = []
        self.slice_tables: list[pa.Table] = []
        self.buffered_cases = 0
        self.buffered_slices = 0  # slice rows waiting for the next commit
        self.seq = 0
        self.last_flush = time.monotonic()
        self.finished = self.failed = 0
        self.objects_done = 0  # objects of the cases finished (for the progress line's estimate)
        self.models: dict[str, set[str]] = {"clip": set(), "sam": set()}
        self.stage_windows = {name: [math.inf, -math.inf] for name in STAGE_TIMES}
        self.first_commit_at: float | None = None
        self.versions: dict[str, dict[str, int]] = {}  # table -> the first and last version this run committed
        self.assembly_seconds = 0.0
        self.assembled = {"in_blocks": 0, "by_tasks": 0}  # cases assembled in the parts tasks / assembly tasks
        self.abandoned: list[str] = []  # cases in flight when an attempt stopped (redone by the next one)

    def resources_changed(self, resources: Resolved) -> None:
        """A new attempt on a changed cluster: size the assembly backlog to it."""
        self.max_inflight = max(2, int(2 * resources.cluster.get("cpus", 2)))

    def abandon_in_flight(self) -> None:
        """An attempt stopped: what is assembled or being assembled is committed (so that the next
        attempt skips it); cases still waiting for slices are dropped (the next attempt redoes them)."""
        self.abandoned = sorted(self.pending) + [json.loads(c["case_json"])["case_id"] for c in self.ready]
        self.pending, self.ready, self.ready_slices = {}, [], 0
        while self.inflight:
            self.collect(timeout=None, at_least_one=True)
        self.flush(force=True)

    # -- rows from the graph --------------------------------------------------------------------------
    def add_rows(self, batch: dict) -> None:
        """A batch of the graph's out rows (numpy columns): the stage windows taken column-wise, then
        per row only what is per case: `done` rows (one per block) taken in, case and part rows counted."""
        kinds = batch.get("row_kind", ())
        if len(kinds):
            timed = kinds != "case"
            for name in STAGE_TIMES:
                first, last = batch[f"first_{name}"][timed], batch[f"last_{name}"][timed]
                seen = first > 0
                if seen.any():
                    window = self.stage_windows[name]
                    window[0] = min(window[0], float(first[seen].min()))
                    window[1] = max(window[1], float(last[seen].max()))
        case_ids, n_slices = batch.get("case_id", ()), batch.get("n_slices", ())
        for i, kind in enumerate(kinds):
            if kind == "done":  # cases assembled in the parts task (stages/assemble.write_parts)
                self._take(pickle.loads(batch["result"][i]), "in_blocks")
                continue
            case_id = str(case_ids[i])
            pending = self.pending.setdefault(case_id, _Pending())
            n = int(n_slices[i])
            if kind == "case":
                pending.case_json, pending.expected = str(batch["case_json"][i]), n
            else:
                pending.got += n
                pending.parts.append(str(batch["part_uri"][i]))
            if pending.complete:
                del self.pending[case_id]
                case = {"case_json": pending.case_json, "parts": pending.parts}
                if pending.expected == 0:  # nothing to segment (skipped, failed at scan): rows right here
                    self._add_case(assemble_isolated(case, self.cfg, self.catalog, self.run_id, self.storage))
                    continue
                if not self.ready:
                    self.ready_since = time.monotonic()
                self.ready.append(case)
                self.ready_slices += pending.expected
        self.dispatch()

    def add_unsegmented(self, case_jsons: list[str]) -> None:
        """Cases with nothing to segment (skipped, failed at the scan), from the board: their rows are
        made here (no mask, no slice), committed with the next flush."""
        for case_json in case_jsons:
            self._add_case(assemble_isolated({"case_json": case_json, "parts": []}, self.cfg, self.catalog,
                                             self.run_id, self.storage))  # fmt: skip
        self.flush()

    # -- assembly in the cluster ----------------------------------------------------------------------
    def dispatch(self, force: bool = False) -> None:

        due = self.ready_slices >= ASSEMBLE_SLICES or len(self.ready) >= ASSEMBLE_CASES
        due = due or (self.ready and time.monotonic() - self.ready_since >= ASSEMBLE_WAIT_S)
        due = due or (self.first_commit_at is None and not self.inflight)  # the run's first cases: at once
        if self.ready and (force or due):
            while len(self.inflight) >= self.max_inflight:  # backpressure: wait for one to finish
                self.collect(timeout=None, at_least_one=True)
            ref = self._task.remote(self.ready, cfg=self._cfg_ref, storage=self.storage, run_id=self.run_id)
            self.inflight.append(ref)
            self.ready, self.ready_slices = [], 0
        if self.inflight:
            self.collect(timeout=0)
        self.flush()

    def collect(self, timeout: float | None, at_least_one: bool = False) -> None:
        """Take in the assembly tasks that have finished (waiting up to `timeout` s for them)."""
        import ray

        if not self.inflight:
            return
        n = 1 if at_least_one else len(self.inflight)
        done, self.inflight = ray.wait(self.inflight, num_returns=n, timeout=timeout)
        for ref in done:
            self._take(ray.get(ref), "by_tasks")

    def _take(self, result: dict, where: str) -> None:
        """What stages/assemble.assemble_cases returned, in an assembly task or a parts task: its
        slices and stage seconds counted in the metrics once for all its cases."""
        self.assembly_seconds += result["finished_at"] - result["started_at"]
        self.assembled[where] += len(result["cases"])
        if result["slices"].num_rows:
            self.slice_tables.append(result["slices"])
            self.buffered_slices += result["slices"].num_rows
        ok_slices, seconds = 0, Counter()
        try:
            for case in result["cases"]:
                self._add_case(case, count_slices=False)
                ok_slices += case["ok_slices"]
                for stage, s in case["stage_seconds"].items():
                    seconds[stage] += max(float(s), 0.0)
        finally:
            if result["cases"]:
                self.metrics.slices_done(ok_slices, seconds)

    def drain(self) -> None:
        """Everything ready dispatched, every assembly taken in and committed."""
        self.dispatch(force=True)
        while self.inflight:
            self.collect(timeout=None, at_least_one=True)
            self.flush()
        self.flush(force=True)

    # -- results --------------------------------------------------------------------------------------
    def _add_case(self, case: dict, count_slices: bool = True) -> None:
        """One finished case's rows into the next commit; count_slices: its slices into the metrics
        (False: the caller counts them with others)."""
        s = self.summary
        for row in case["case_rows"]:
            self.case_rows.append(row)
            s.by_status[row["status"]] = s.by_status.get(row["status"], 0) + 1
            if row.get("error_code"):
                s.by_error[row["error_code"]] = s.by_error.get(row["error_code"], 0) + 1
        for name in ("clip", "sam"):
            self.models[name].update(case["models"][name])
        s.slices += case["slices"]
        s.cases += 1
        self.objects_done += len(case["case_rows"][0]["source_uris"] or ()) if case["case_rows"] else 0
        if count_slices:
            self.metrics.slices_done(case["ok_slices"], case["stage_seconds"])
        self.buffered_cases += 1
        self.finished += 1
        self.failed += bool(case["failed"])
        budget = self.cfg.failure_budget
        if self.finished >= budget.min_cases and self.failed / self.finished > budget.max_failed_fraction:
            self.flush(force=True)
            top = dict(Counter(s.by_error).most_common(3))
            raise JobAborted(
                f"failure budget exceeded: {self.failed} of {self.finished} finished cases failed "
                f"(> {budget.max_failed_fraction:.0%}); top errors: {top}"
            )

    def flush(self, force: bool = False) -> None:
        """Commit the buffered cases, in parts of at most outputs.catalog_flush_cases cases."""
        due = (
            self.first_commit_at is None  # the run's first finished case is visible at once
            or self.buffered_cases >= self.cfg.outputs.catalog_flush_cases
            or self.buffered_slices >= self.cfg.outputs.catalog_flush_slices
            or time.monotonic() - self.last_flush >= self.cfg.outputs.catalog_flush_seconds
        )
        if not self.case_rows or not (force or due):
            return
        slices = pa.concat_tables(self.slice_tables) if self.slice_tables else SLICES_SCHEMA.empty_table()
        order: list[str] = list(dict.fromkeys(r["case_id"] for r in self.case_rows))  # cases, in arrival order
        size = max(1, self.cfg.outputs.catalog_flush_cases)
        reason = self.fenced()
        if reason:
            raise JobAborted(reason)
        for first in range(0, len(order), size):
            part = set(order[first : first + size])
            rows = [r for r in self.case_rows if r["case_id"] in part]
            mask = pc.is_in(slices.column("case_id"), value_set=pa.array(sorted(part)))
            now = datetime.now(UTC).isoformat()
            for row in rows:
                row["committed_at"] = now
            result = self.catalog.commit(self.run_id, self.seq, rows,
                                         slices.filter(mask) if len(order) > size else slices,
                                         window=self.window)  # fmt: skip
            self.summary.dropped += result.dropped
            self.summary.replaced += result.replaced
            for table, version in (result.versions or {}).items():
                self.versions.setdefault(table, {"first": version})["last"] = version
            for (target, status, code), n in Counter(
                (r["target"], r["status"], r.get("error_code")) for r in rows
            ).items():
                self.metrics.case(target, status, code, n)
            failed = {r["case_id"] for r in rows if r["status"] == Status.FAILED}
            self.metrics.committed(len(part), len(failed))
            if self.first_commit_at is None:
                self.first_commit_at = time.time()
            self.seq += 1
            if self.seq == self.cfg.testing.exit_driver_after_commits:  # test-only: a crash right here
                os._exit(137)
        self.case_rows, self.slice_tables, self.buffered_cases, self.buffered_slices = [], [], 0, 0
        self.last_flush = time.monotonic()

    def table_versions(self) -> dict[str, dict[str, int]]:
        """table -> {"first", "last"}: the Delta versions this run's commits produced (run record)."""
        return {table: dict(v) for table, v in self.versions.items()}

    def timeline(self) -> dict:
        """When each stage first and last finished a slice (epoch seconds): the stages' overlap."""
        return {
            name.removesuffix("_at"): {"first": w[0], "last": w[1]}
            for name, w in self.stage_windows.items()
            if w[0] != math.inf
        }
