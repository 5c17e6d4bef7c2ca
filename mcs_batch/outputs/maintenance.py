"""Keeping OUT's tables fit for years of nightly runs: compaction, vacuum, history (`mcs-batch catalog`).

- compact: each table's small files rewritten into few large ones (delta-rs `optimize.compact`, one
  commit that readers and concurrent writers see atomically), slice rows that belong to no committed
  case row (a crash between the two commits of a flush, a lost race, a replaced row) deleted, a log
  checkpoint written and log entries past the tables' retention (a week) removed, so that opening a
  table reads one checkpoint and a few log entries. A job compacts at its end the tables (the archive
  index too) that gathered `outputs.compact_min_files` files or more, and vacuums them (`maintain`).
- vacuum: data files no version within the time-travel window references (delta-rs `vacuum`: files
  removed from the table longer ago than the table's delta.logRetentionDuration, a week), then mask
  files no committed row references and older than a week (a live run writes its masks before
  committing their rows: a young mask is never removed). Every job vacuums every table at its end:
  a removed file must be vacuumed before a checkpoint forgets its tombstone (outputs/delta.py).
- history: each table's commits, with the run that made them.

Slice rows of live runs (their heartbeats, outputs/lease.py) are never treated as orphans: a live run
may be between the slices and the cases commit of a flush.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from mcs_batch.outputs.catalog import CASES, MASKS_DIR, SLICES, TABLES, Catalog, quote
from mcs_batch.outputs.delta import time_travel_seconds, with_retries
from mcs_batch.outputs.index import ArchiveIndex
from mcs_batch.outputs.lease import live_runs

VACUUM_RETENTION_HOURS = 168  # data and mask files younger than a week are kept (time travel, live runs)
ORPHANS_PER_DELETE = 400  # (case, target) pairs named in one delete predicate
HEARTBEAT_TTL_S = 120.0


def _tables(catalog: Catalog, index: str | None) -> dict[str, Callable[[], object]]:
    """name -> a function opening that table at its latest version (None when absent)."""
    out: dict[str, Callable[[], object]] = {spec.name: (lambda spec=spec: catalog.table(spec)) for spec in TABLES}
    if index is not None:
        archive = ArchiveIndex(index, storage=catalog.storage)
        out["index"] = archive.table
    return out


def file_counts(catalog: Catalog, *, index: str | None = None) -> dict[str, int]:
    """table -> data files of its current version (from the log: no listing)."""
    counts = {}
    for name, open_ in _tables(catalog, index).items():
        dt = open_()
        if dt is not None:
            counts[name] = len(dt.file_uris())
    return counts


def maintain(catalog: Catalog, *, min_files: int, index: str | None = None) -> dict[str, dict]:
    """What a job does at its end: compact() the tables holding at least `min_files` data files, and
    vacuum every table (the files removed from it longer ago than its time-travel window)."""
    due = [name for name, n in file_counts(catalog, index=index).items() if n >= min_files]
    done: dict[str, dict] = compact(catalog, tables=due, index=index) if due else {}
    for name, files in vacuum(catalog, retention_hours=None, index=index, masks=False).items():
        done.setdefault(name, {})["vacuumed"] = len(files)
    return done


def compact(catalog: Catalog, *, tables: list[str] | None = None, index: str | None = None) -> dict[str, dict]:
    """Compact the tables (all by default; the archive index too when its root is given): orphan slice
    rows deleted, small files rewritten, a checkpoint written, log entries past the retention removed.
    Returns table -> {files_before, files_after, orphans_deleted, version}."""
    out: dict[str, dict] = {}
    for name, open_ in _tables(catalog, index).items():
        if tables is not None and name not in tables:
            continue
        dt = open_()
        if dt is None:
            continue
        before = len(dt.file_uris())
        orphans = _delete_orphan_slices(catalog) if name == SLICES.name else 0
        catalog._crash("during_compaction")
        with_retries(lambda open_=open_: open_().optimize.compact(), what=f"compacting {name}")
        dt = open_()
        dt.create_checkpoint()
        dt.cleanup_metadata()  # log entries older than the table's log retention, before the checkpoint
        out[name] = {"files_before": before, "files_after": len(dt.file_uris()), "orphans_deleted": orphans,
                     "version": dt.version()}  # fmt: skip
    return out


def orphan_slices(catalog: Catalog) -> pa.Table:
    """(run_id, case_id, target) of slice rows whose pair's committed row is of another run (or none),
    runs still alive left out."""
    keys = ["case_id", "target", "run_id"]
    slices = catalog.read(SLICES, keys)
    if not slices.num_rows:
        return slices
    pairs = slices.group_by(keys).aggregate([])
    orphans = pairs.join(catalog.read(CASES, keys), keys=keys, join_type="left anti")
    live = sorted(live_runs(catalog, HEARTBEAT_TTL_S))
    if live:
        orphans = orphans.filter(pc.invert(pc.is_in(orphans.column("run_id"), value_set=pa.array(live))))
    return orphans


def _delete_orphan_slices(catalog: Catalog) -> int:
    orphans = orphan_slices(catalog)
    if not orphans.num_rows:
        return 0
    deleted = 0
    for run_id in sorted(set(orphans.column("run_id").to_pylist())):
        mine = orphans.filter(pc.equal(orphans.column("run_id"), run_id))
        pairs = list(zip(mine.column("case_id").to_pylist(), mine.column("target").to_pylist(), strict=True))
        for first in range(0, len(pairs), ORPHANS_PER_DELETE):
            chunk = pairs[first : first + ORPHANS_PER_DELETE]
            either = " OR ".join(f"(case_id = {quote(c)} AND target = {quote(t)})" for c, t in chunk)
            predicate = f"run_id = {quote(run_id)} AND ({either})"
            result = with_retries(lambda p=predicate: catalog.table(SLICES).delete(p), what="deleting orphan slices")
            deleted += int(result.get("num_deleted_rows", 0))
    return deleted


def vacuum(catalog: Catalog, *, retention_hours: int | None = VACUUM_RETENTION_HOURS, dry_run: bool = False,
           tables: list[str] | None = None, index: str | None = None, masks: bool = True) -> dict:  # fmt: skip
    """Files no current row needs: {table: data files removed, "masks": mask files removed}.
    retention_hours None: each table's time-travel window (delta.logRetentionDuration)."""
    out: dict[str, list[str]] = {}
    for name, open_ in _tables(catalog, index).items():
        if tables is not None and name not in tables:
            continue
        dt = open_()
        if dt is not None:
            seconds = time_travel_seconds(dt) if retention_hours is None else retention_hours * 3600
            out[name] = _vacuum_table(dt, seconds, dry_run)
    catalog._crash("during_vacuum")
    if masks:
        out["masks"] = _vacuum_masks(catalog, VACUUM_RETENTION_HOURS if retention_hours is None else retention_hours,
                                     dry_run)  # fmt: skip
    return out


def _vacuum_table(dt, seconds: float, dry_run: bool) -> list[str]:
    """delta-rs vacuum of the files removed from the table longer than `seconds` ago. Its retention is
    whole hours: a shorter window (tests and benchmarks scale a week to seconds) keeps instead the
    files of every version committed within it, and of the one standing at its start."""
    if seconds % 3600 == 0:
        return dt.vacuum(retention_hours=int(seconds // 3600), dry_run=dry_run, enforce_retention_duration=False)
    cutoff_ms = (time.time() - seconds) * 1000
    versions = sorted((e["version"], e.get("timestamp", 0)) for e in dt.history())
    keep = [v for v, ts in versions if ts >= cutoff_ms]
    before = [v for v, ts in versions if ts < cutoff_ms]
    keep += before[-1:]
    return dt.vacuum(retention_hours=0, dry_run=dry_run, enforce_retention_duration=False,
                     keep_versions=sorted(keep) or [dt.version()])  # fmt: skip


def _vacuum_masks(catalog: Catalog, retention_hours: int, dry_run: bool) -> list[str]:
    rows = catalog.cases(["mask_uri", "mask_png_uri", "seg_uri"])
    referenced = {catalog.fs._strip_protocol(u) for c in rows.column_names for u in rows.column(c).to_pylist() if u}
    try:
        found = catalog.fs.find(catalog.path(MASKS_DIR), detail=True)
    except FileNotFoundError:
        return []
    cutoff = time.time() - retention_hours * 3600
    removed = []
    for path, info in found.items():
        if info.get("type", "file") != "file" or path in referenced or _mtime(info) > cutoff:
            continue
        removed.append(path)
        if not dry_run:
            catalog.fs.rm(path)
    return sorted(removed)


def _mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return time.time()  # unknown: count it as young (never removed on a guess)


def history(catalog: Catalog, *, limit: int = 20) -> list[dict]:
    """The latest commits of every table, newest first: table, version, time, operation, run, rows."""
    out = []
    for spec in TABLES:
        dt = catalog.table(spec)
        if dt is None:
            continue
        for entry in dt.history(limit):
            metrics = entry.get("operationMetrics") or {}
            rows = metrics.get("num_added_rows", metrics.get("num_target_rows_inserted"))
            out.append({
                "table": spec.name,
                "version": entry.get("version"),
                "time": datetime.fromtimestamp(entry.get("timestamp", 0) / 1000, UTC).isoformat(timespec="seconds"),
                "operation": entry.get("operation"),
                "run_id": entry.get("mcs_batch.run_id", ""),
                "rows": rows,
            })  # fmt: skip
    return sorted(out, key=lambda e: (e["time"], e["table"], e["version"]), reverse=True)
