"""The cohort segmentation job: a streaming Ray Data pipeline from an archive to masks and a catalog.

    list objects -> probe headers + group into cases (tasks, one shuffle)
      -> plan: case row + chunks of slices       (tasks)
      -> load: decode, window, slice              (CPU tasks, ahead of the models)
      -> saliency: BiomedCLIP + M2IB              (actor pool; GPUs when configured)
      -> prompts: coarse mask, components, boxes  (CPU tasks)
      -> masks: SAM                               (actor pool; restarts on failure)
      -> writer (this process): slices back into cases, masks in source geometry, atomic commits

The writer holds only cases in flight (their bit-packed slice masks) and a small buffer of rows; it
commits every `outputs.catalog_flush_cases` cases, so first outputs appear while later cases are read.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.errors import ConfigError, ErrorCode
from mcs_batch.io.discover import list_objects
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.assemble import assemble_target, base_case_row, failed_from_slices, status_of
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes, png_bytes
from mcs_batch.records import CASE_ROW, CaseRecord, Status
from mcs_batch.scan import cases_dataset
from mcs_batch.stages.load import load_batch, plan_batch
from mcs_batch.stages.masking import SamStage
from mcs_batch.stages.prompting import prompts_batch
from mcs_batch.stages.saliency import SaliencyStage
from mcs_batch.telemetry import STAGES, JobMetrics

PACKAGES = ("mcs-batch", "ray", "torch", "open_clip_torch", "segment-anything", "pydicom", "nibabel", "pyarrow")
PROGRESS_SECONDS = 10.0


class JobAborted(RuntimeError):
    """The failure budget was exceeded: the job stops early (what was finished is committed)."""


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _model_stage(rows, stage, cfg: JobConfig, storage, *, batch: int, actors: int, cpus: float, gpus: float):
    """An actor pool that loads its model once per actor; a crashed actor is restarted and its batch
    retried, so no case is lost or duplicated."""
    import ray

    return rows.map_batches(
        stage,
        fn_constructor_kwargs={"cfg": cfg, "storage": storage},
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
        max_restarts=-1,
        max_task_retries=-1,
    )


def build_pipeline(cases, cfg: JobConfig, *, storage: StorageOptions | None, skip: frozenset[str]):
    """The Ray Data graph from case rows to per-slice results (lazy; nothing runs until consumed)."""
    res = cfg.resources
    rows = cases.flat_map(plan_batch, fn_kwargs={"cfg": cfg, "skip": skip}, num_cpus=0.25)
    rows = rows.map_batches(
        load_batch, fn_kwargs={"cfg": cfg, "storage": storage}, batch_size=1, num_cpus=res.load_cpus
    )
    rows = _model_stage(rows, SaliencyStage, cfg, storage, batch=res.saliency_batch, actors=res.saliency_actors,
                        cpus=res.saliency_cpus, gpus=res.saliency_gpus)  # fmt: skip
    rows = rows.map_batches(
        prompts_batch, fn_kwargs={"cfg": cfg}, batch_size=res.saliency_batch, num_cpus=res.prompts_cpus
    )
    return _model_stage(rows, SamStage, cfg, storage, batch=res.sam_batch, actors=res.sam_actors,
                        cpus=res.sam_cpus, gpus=res.sam_gpus)  # fmt: skip


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
                pending.record = CaseRecord.from_row(json.loads(row["case_json"]))
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


def run_job(
    cfg: JobConfig,
    *,
    storage: StorageOptions | None = None,
    retry_failed: bool = False,
    progress: Callable[[str], None] = print,
) -> JobSummary:
    """Run the job on the current Ray cluster (ray.init() must have been called)."""
    start = time.perf_counter()
    if not cfg.inputs.uris:
        raise ConfigError("inputs.uris: no inputs given")
    catalog = Catalog(cfg.outputs.uri, storage=storage)
    run_id = new_run_id()
    config_hash = cfg.hash()
    other = catalog.config_hashes() - {config_hash}
    if other:
        raise ConfigError(
            f"{cfg.outputs.uri} holds results of another configuration ({', '.join(sorted(other))}; this one is "
            f"{config_hash}): write to a new output folder"
        )
    removed = catalog.repair()
    if removed:
        progress(f"removed {len(removed)} uncommitted file(s) left by an interrupted run")
    if retry_failed:
        progress(f"retrying {len(catalog.drop_failed())} failed (case, target) pair(s)")
    committed = set(catalog.committed())
    targets = {t.name for t in cfg.targets}
    per_case: dict[str, set[str]] = {}
    for case_id, target in committed:
        per_case.setdefault(case_id, set()).add(target)
    skip = frozenset(c for c, ts in per_case.items() if targets <= ts)

    summary = JobSummary(run_id=run_id, out=cfg.outputs.uri, config_hash=config_hash, tiny_models=cfg.models.tiny)
    summary.skipped_committed = len(skip)
    document = {
        "run_id": run_id,
        "status": "running",
        "started_at": datetime.now(UTC).isoformat(),
        "config": cfg.to_dict(),
        "config_hash": config_hash,
        "packages": package_versions(),
        "tiny_models": cfg.models.tiny,
    }
    summary.run_uri = catalog.write_run(run_id, document)
    refs = list_objects(cfg.inputs.uris, storage=storage, include=cfg.inputs.include, exclude=cfg.inputs.exclude)
    progress(f"run {run_id}: {len(refs)} objects listed; {len(skip)} case(s) already committed")
    metrics = JobMetrics(cfg.outputs.metrics_port)
    writer = CaseWriter(catalog, cfg, run_id, committed, summary, metrics)
    try:
        if refs:
            rows = build_pipeline(cases_dataset(refs, storage=storage), cfg, storage=storage, skip=skip)
            last = time.monotonic()
            for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add_batch(batch)
                if time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    rate = summary.slices / (time.perf_counter() - start)
                    progress(
                        f"{summary.cases} case(s) done ({writer.failed} failed), {summary.slices} slice(s), "
                        f"{rate:.2f} slices/s, {len(writer.pending)} in flight"
                    )
        writer.flush(force=True)
        if writer.pending:  # an invariant: every planned slice must come back
            raise RuntimeError(f"{len(writer.pending)} case(s) did not complete: {sorted(writer.pending)[:3]}")
        document["status"] = "succeeded"
    except JobAborted as e:
        summary.aborted = str(e)
        document["status"] = "aborted"
        document["reason"] = str(e)
    finally:
        metrics.close()
        summary.seconds = time.perf_counter() - start
        document.update(
            finished_at=datetime.now(UTC).isoformat(),
            wall_seconds=round(summary.seconds, 3),
            counts={
                "cases": summary.cases,
                "slices": summary.slices,
                "by_status": summary.by_status,
                "by_error": summary.by_error,
            },
            model_sha256={k: sorted(v) for k, v in writer.models.items()},
        )
        if document["status"] == "running":
            document["status"] = "failed"
        catalog.write_run(run_id, document)
    return summary
