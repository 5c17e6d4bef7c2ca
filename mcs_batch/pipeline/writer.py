"""The job's sink: slice rows gathered back into cases, masks written, catalog rows committed.

The writer holds only cases in flight (their bit-packed slice masks) and a small buffer of rows; it
commits every `outputs.catalog_flush_cases` cases (or `catalog_flush_seconds`), so first outputs
appear while later cases are read. Commit protocol: mcs_batch.outputs.catalog.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.errors import ErrorCode
from mcs_batch.outputs.assemble import assemble_target, base_case_row, failed_from_slices, status_of
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes, png_bytes
from mcs_batch.records import CaseRecord, Status
from mcs_batch.rows import CASE_ROW, case_of
from mcs_batch.telemetry import STAGES, JobMetrics


class JobAborted(RuntimeError):
    """The failure budget was exceeded: the job stops early (what was finished is committed)."""


@dataclass
class _Pending:
    record: CaseRecord | None = None
    expected: int | None = None
    slices: dict[int, dict] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.record is not None and len(self.slices) == self.expected


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
            f"  already committed, skipped: {self.skipped_committed} case(s)",
            f"  outputs: {self.out}  (masks/, catalog/cases, catalog/slices, {self.run_uri})",
            f'  example: mcs-batch query {self.out} "SELECT status, error_code, count(*) FROM cases GROUP BY 1, 2"',
        ]
        if self.aborted:
            lines.insert(0, f"ABORTED: {self.aborted}")
        return lines


class CaseWriter:
    """The pipeline's sink: gathers slice rows into cases, writes masks and commits catalog rows."""

    def __init__(
        self,
        catalog: Catalog,
        cfg: JobConfig,
        run_id: str,
        committed: set[tuple[str, str]],
        summary: JobSummary,
        metrics: JobMetrics,
    ):
        self.catalog, self.cfg, self.run_id, self.committed, self.summary = catalog, cfg, run_id, committed, summary
        self.metrics = metrics
        self.pending: dict[str, _Pending] = {}
        self.case_rows: list[dict] = []
        self.slice_rows: list[dict] = []
        self.buffered_cases = 0
        self.seq = 0
        self.last_flush = time.monotonic()
        self.finished = self.failed = 0
        self.models: dict[str, set[str]] = {"clip": set(), "sam": set()}

    def add_batch(self, batch: dict) -> None:
        n = len(batch["case_id"])
        columns = list(batch)
        for i in range(n):
            row = {c: batch[c][i] for c in columns}
            case_id, k = str(row["case_id"]), int(row["slice_index"])
            pending = self.pending.setdefault(case_id, _Pending())
            if k == CASE_ROW:
                pending.record = case_of(row)
                pending.expected = int(row["n_slices"])
            else:
                pending.slices[k] = row
                self.summary.slices += 1
                if not row["error_code"]:
                    self.metrics.slice_done({stage: row[f"{stage}_s"] for stage in STAGES})
            if pending.complete:
                self._finish(self.pending.pop(case_id))
                self.flush()

    def _finish(self, pending: _Pending) -> None:
        record, cfg = pending.record, self.cfg
        error = failed_from_slices(pending.slices)
        status = status_of(record, error)
        tiny = any(bool(r.get("models_tiny")) for r in pending.slices.values())
        case_failed = status == Status.FAILED
        for j, target in enumerate(cfg.targets):
            if (record.case_id, target.name) in self.committed:
                continue
            row = {**base_case_row(record, j, cfg), "status": status, "run_id": self.run_id, "tiny_models": tiny}
            if error:
                row["error_code"], row["error_message"] = error
            if status == Status.OK:
                try:
                    self._write_masks(record, pending, j, row, tiny)
                except Exception as e:  # one unwritable target must not stop the job
                    message = f"writing masks of {record.case_id}/{target.name}: {type(e).__name__}: {e}"
                    row.update(status=Status.FAILED, error_code=ErrorCode.INTERNAL_ERROR, error_message=message)
                    case_failed = True
            self.case_rows.append(row)
            self.metrics.case(target.name, row["status"], row.get("error_code"))
            self.summary.by_status[row["status"]] = self.summary.by_status.get(row["status"], 0) + 1
            if row.get("error_code"):
                self.summary.by_error[row["error_code"]] = self.summary.by_error.get(row["error_code"], 0) + 1
        for r in pending.slices.values():
            for name in ("clip", "sam"):
                if r.get(f"{name}_sha256"):
                    self.models[name].add(str(r[f"{name}_sha256"]))
        self.buffered_cases += 1
        self.summary.cases += 1
        self.finished += 1
        self.failed += case_failed
        budget = cfg.failure_budget
        if self.finished >= budget.min_cases and self.failed / self.finished > budget.max_failed_fraction:
            self.flush(force=True)
            top = dict(Counter(self.summary.by_error).most_common(3))
            raise JobAborted(
                f"failure budget exceeded: {self.failed} of {self.finished} finished cases failed "
                f"(> {budget.max_failed_fraction:.0%}); top errors: {top}"
            )

    def _write_masks(self, record: CaseRecord, pending: _Pending, j: int, row: dict, tiny: bool) -> None:
        """Masks of target j (NIfTI in the source geometry; PNG too for 2D), then its row fields."""
        cfg, target = self.cfg, self.cfg.targets[j]
        built = assemble_target(record, pending.slices, j, cfg)
        affine = np.asarray(record.affine, float).reshape(4, 4)
        nifti_path, png_path = self.catalog.mask_paths(record.case_id, target.name)
        self.catalog.write_bytes(nifti_path, nifti_bytes(built.mask, affine, tiny=tiny))
        row["mask_uri"] = self.catalog.fs.unstrip_protocol(nifti_path)
        if record.shape[2] == 1 and cfg.outputs.png_masks_for_2d:
            self.catalog.write_bytes(png_path, png_bytes(built.mask[:, :, 0].T))
            row["mask_png_uri"] = self.catalog.fs.unstrip_protocol(png_path)
        any_slice = next(iter(pending.slices.values()), {})
        row.update(built.case_row, clip_sha256=any_slice.get("clip_sha256"), sam_sha256=any_slice.get("sam_sha256"))
        self.slice_rows.extend({**s, "run_id": self.run_id} for s in built.slice_rows)

    def flush(self, force: bool = False) -> None:
        due = self.buffered_cases >= self.cfg.outputs.catalog_flush_cases or (
            time.monotonic() - self.last_flush >= self.cfg.outputs.catalog_flush_seconds
        )
        if not self.case_rows or not (force or due):
            return
        now = datetime.now(UTC).isoformat()
        for row in self.case_rows:
            row["committed_at"] = now
        self.catalog.commit(self.run_id, self.seq, self.case_rows, self.slice_rows)
        self.seq += 1
        if self.seq == self.cfg.testing.exit_driver_after_commits:  # test-only: a crash right here
            os._exit(137)
        self.case_rows, self.slice_rows, self.buffered_cases = [], [], 0
        self.last_flush = time.monotonic()
