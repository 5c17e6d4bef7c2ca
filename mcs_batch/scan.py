"""`scan`: discovery and header validation of an archive on Ray, written as a Parquet manifest.

    list the archive in parallel tasks into waves -> probe headers (parallel tasks) -> group into cases
    as series complete (one actor) -> manifest/*.parquet          (mcs_batch.archive, as the job does)

Every listed object ends in exactly one manifest row's source_uris, with status ok, skipped or
failed. Nothing here reads pixel data; headers the archive index already holds are not read again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads

from mcs_batch.archive.grouping import cases_of_series
from mcs_batch.archive.listing import list_archive
from mcs_batch.archive.probe import probe_refs
from mcs_batch.archive.source import cases_stream
from mcs_batch.io.dicom_header import DicomHeader
from mcs_batch.io.discover import list_objects
from mcs_batch.io.storage import StorageOptions, arrow_filesystem, filesystem_for, join
from mcs_batch.outputs.schema import MANIFEST_SCHEMA, manifest_table
from mcs_batch.records import CaseRecord, Status


def discover_cases(
    inputs: Sequence[str],
    *,
    storage: StorageOptions | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[CaseRecord]:
    """The same cases as `scan`, computed in this process (no Ray): for a few files at a time."""
    refs = list_objects(inputs, storage=storage, include=include, exclude=exclude)
    series: dict[str, list[DicomHeader]] = {}
    records: list[CaseRecord] = []
    for payload in probe_refs(refs, storage=storage, threads=1):
        item = json.loads(payload)
        if "record" in item:
            records.append(CaseRecord.from_row(item["record"]))
            continue
        header = DicomHeader.from_dict(item["header"])
        series.setdefault(header.series_uid or f"object:{header.rel}", []).append(header)
    for headers in series.values():
        records.extend(cases_of_series(headers))
    return sorted(records, key=lambda r: r.case_id)


@dataclass
class ScanSummary:
    objects: int
    cases: int
    by_status: dict[str, int]
    by_kind: dict[str, int]
    by_modality: dict[str, int]
    by_error: dict[str, int]
    bytes_read: int
    seconds: float
    manifest_uri: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    def lines(self) -> list[str]:
        def fmt(counts: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"

        rate = self.objects / self.seconds if self.seconds else 0.0
        return [
            f"scanned {self.objects} objects into {self.cases} cases in {self.seconds:.1f} s ({rate:.0f} objects/s, "
            f"{self.bytes_read / max(self.objects, 1) / 1024:.1f} KiB read per object)",
            f"  status:   {fmt(self.by_status)}",
            f"  kind:     {fmt(self.by_kind)}",
            f"  modality: {fmt(self.by_modality)}",
            f"  errors:   {fmt(self.by_error)}",
            f"  manifest: {self.manifest_uri}",
        ]


def read_manifest(out: str, *, storage: StorageOptions | None = None) -> pa.Table:
    """The manifest written by `scan` under OUT, as one table sorted by case_id."""
    fs, path = arrow_filesystem(join(out, "manifest"), storage)
    table = pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA).to_table()
    return table.sort_by("case_id")


def scan(
    inputs: Sequence[str],
    out: str,
    *,
    storage: StorageOptions | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    wave_objects: int = 2000,
    index: str | None = None,
    progress=print,
) -> ScanSummary:
    """Scan the inputs on the current Ray cluster (ray.init() must have been called) into OUT/manifest/."""
    start = time.perf_counter()
    manifest_uri = join(out, "manifest")
    out_fs, out_path = filesystem_for(manifest_uri, storage)
    staging = join(out, "staging", "scan-" + uuid.uuid4().hex[:8])
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-scan"
    try:
        waves = list_archive(inputs, storage=storage, include=include, exclude=exclude, wave_objects=wave_objects,
                             index_uri=index or join(out, "index"), staging_uri=join(staging, "waves"))  # fmt: skip
        objects = sum(w.objects for w in waves)
        progress(f"listed {objects} objects under {len(inputs)} input(s) in {len(waves)} wave(s)")
        if out_fs.exists(out_path):
            out_fs.rm(out_path, recursive=True)  # a scan replaces the previous manifest as a whole
        out_fs.makedirs(out_path, exist_ok=True)
        if waves:
            arrow_fs, path = arrow_filesystem(manifest_uri, storage)
            cases = cases_stream(waves, storage=storage, index_uri=index or join(out, "index"), run_id=run_id)
            cases.drop_columns(["done_targets", "redo"]).write_parquet(path, filesystem=arrow_fs)
    finally:
        staging_fs, staging_path = filesystem_for(staging, storage)
        if staging_fs.exists(staging_path):
            staging_fs.rm(staging_path, recursive=True)
    table = read_manifest(out, storage=storage) if waves else manifest_table([])
    summary = summarize(table, objects=objects, seconds=time.perf_counter() - start, manifest_uri=manifest_uri)
    accounted = sum(len(u) for u in table.column("source_uris").to_pylist())
    if accounted != objects:  # an invariant: a mismatch is a bug, and it must be loud
        raise RuntimeError(f"scan accounted for {accounted} objects, listed {objects}")
    with out_fs.open(join(out_path.rsplit("/", 1)[0], "scan.json"), "w") as f:
        json.dump(summary.to_dict(), f, indent=2)
    return summary


def summarize(table: pa.Table, *, objects: int, seconds: float, manifest_uri: str) -> ScanSummary:
    rows = table.select(["status", "kind", "modality", "error_code", "bytes_read"]).to_pylist()
    return ScanSummary(
        objects=objects,
        cases=table.num_rows,
        by_status=dict(Counter(r["status"] for r in rows)),
        by_kind=dict(Counter(r["kind"] for r in rows)),
        by_modality=dict(Counter(r["modality"] or "-" for r in rows if r["status"] == Status.OK)),
        by_error=dict(Counter(r["error_code"] for r in rows if r["error_code"])),
        bytes_read=sum(r["bytes_read"] or 0 for r in rows),
        seconds=seconds,
        manifest_uri=manifest_uri,
    )
