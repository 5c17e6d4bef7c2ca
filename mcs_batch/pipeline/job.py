"""The cohort segmentation job: a streaming Ray Data pipeline from an archive to masks and a catalog.

    list objects -> probe headers + group into cases (tasks, one shuffle)
      -> plan: case row + chunks of slices       (tasks)
      -> load: decode, window, slice              (CPU tasks, ahead of the models)
      -> saliency: BiomedCLIP + M2IB              (actor pool; GPUs when configured)
      -> prompts: coarse mask, components, boxes  (CPU tasks)
      -> masks: SAM                               (actor pool; restarts on failure)
      -> writer (this process): slices back into cases, masks in source geometry, atomic commits

The graph is built in graph.py from the stages in mcs_batch.stages; the writer is writer.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata

from mcs_batch.config import JobConfig
from mcs_batch.errors import ConfigError
from mcs_batch.io.discover import list_objects
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline.graph import build_pipeline
from mcs_batch.pipeline.writer import CaseWriter, JobAborted, JobSummary
from mcs_batch.scan import cases_dataset
from mcs_batch.telemetry import JobMetrics

PACKAGES = ("mcs-batch", "ray", "torch", "open_clip_torch", "segment-anything", "pydicom", "nibabel", "pyarrow")
PROGRESS_SECONDS = 10.0


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
