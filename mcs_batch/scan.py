"""`scan`: discovery and header validation of an archive on Ray Data, written as a Parquet manifest.

    list objects (driver) -> probe headers (parallel tasks) -> group by series (shuffle)
    -> assemble cases (parallel) -> manifest/*.parquet

Every listed object ends in exactly one manifest row's source_uris, with status ok, skipped or
failed. Nothing here reads pixel data.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.dicom_header import DicomHeader
from mcs_batch.io.discover import ObjectRef, Probe, group_key, list_objects, probe_object
from mcs_batch.io.series import cases_from_headers
from mcs_batch.io.storage import StorageOptions, arrow_filesystem, filesystem_for, join
from mcs_batch.outputs.schema import MANIFEST_SCHEMA, manifest_table
from mcs_batch.records import CaseKind, CaseRecord, Status, failed_record

PROBE_BATCH = 256  # objects per probe task (fewer, larger tasks: Ray schedules each one)
IO_THREADS = 8  # concurrent header reads per probe task on object stores
GROUP_PARTITION_ROWS = 2000  # probe rows per shuffle partition when grouping into series


def _probe_one(ref: ObjectRef, fs) -> Probe:
    try:
        return probe_object(ref, fs=fs)
    except Exception as e:  # a bug must not take the batch down: record it against the object
        return Probe(ref, record=failed_record(
            f"file:{ref.rel}", CaseKind.UNKNOWN, ref.uri, ref.rel, ErrorCode.INTERNAL_ERROR,
            f"{ref.uri}: {type(e).__name__}: {e}",
        ))  # fmt: skip


def _probe_batch(batch: dict, *, storage: StorageOptions | None, threads: int) -> dict:
    """Ray task: identify and parse the headers of a batch of objects. Object stores answer each
    request with latency, so the reads of one batch overlap in a few threads."""
    refs = [
        ObjectRef(uri=str(uri), rel=str(rel), size=int(size))
        for uri, rel, size in zip(batch["uri"], batch["rel"], batch["size"], strict=True)
    ]
    fs, _ = filesystem_for(refs[0].uri, storage)
    if threads > 1 and len(refs) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            probes = list(pool.map(lambda r: _probe_one(r, fs), refs))
    else:
        probes = [_probe_one(r, fs) for r in refs]
    payloads = [
        json.dumps({"header": p.header.to_dict()} if p.header is not None else {"record": p.record.to_row()})
        for p in probes
    ]
    return {"group": [group_key(p) for p in probes], "payload": payloads}


def _assemble_group(batch: pa.Table) -> pa.Table:
    """Ray task: all probes of one group (one DICOM series, or one object) -> case rows."""
    headers: list[DicomHeader] = []
    rows: list[dict] = []
    for payload in batch.column("payload").to_pylist():
        item = json.loads(payload)
        if "header" in item:
            headers.append(DicomHeader.from_dict(item["header"]))
        else:
            rows.append(item["record"])
    if headers:
        try:
            rows.extend(r.to_row() for r in cases_from_headers(headers))
        except Exception as e:  # never lose the objects of a series to a bug: one failure row each
            error = e.code if isinstance(e, CaseError) else ErrorCode.INTERNAL_ERROR
            for h in headers:
                rows.append(failed_record(
                    f"file:{h.rel}", CaseKind.DICOM_SERIES, h.uri, h.rel, error, f"{h.uri}: {type(e).__name__}: {e}",
                ).to_row())  # fmt: skip
    return manifest_table(rows)


def discover_cases(
    inputs: Sequence[str],
    *,
    storage: StorageOptions | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[CaseRecord]:
    """The same cases as `scan`, computed in this process (no Ray): for a few files at a time."""
    refs = list_objects(inputs, storage=storage, include=include, exclude=exclude)
    if not refs:
        return []
    batch = {"uri": [r.uri for r in refs], "rel": [r.rel for r in refs], "size": [r.size for r in refs]}
    probes = _probe_batch(batch, storage=storage, threads=1)
    groups: dict[str, list[str]] = {}
    for key, payload in zip(probes["group"], probes["payload"], strict=True):
        groups.setdefault(key, []).append(payload)
    records = []
    for payloads in groups.values():
        table = _assemble_group(pa.table({"payload": payloads}))
        records.extend(CaseRecord.from_row(row) for row in table.to_pylist())
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


def cases_dataset(refs: Sequence[ObjectRef], *, storage: StorageOptions | None = None):
    """A Ray Dataset of manifest rows (one per case) for the listed objects: probe headers in
    parallel tasks, group by series (a shuffle: a series is complete only when all files are seen),
    assemble cases in parallel."""
    import ray

    blocks = max(1, min(len(refs) // PROBE_BATCH + 1, 200))
    ds = ray.data.from_items([r.to_dict() for r in refs], override_num_blocks=blocks)
    threads = 1 if refs[0].uri.startswith("file://") else IO_THREADS
    probes = ds.map_batches(
        _probe_batch, fn_kwargs={"storage": storage, "threads": threads}, batch_size=PROBE_BATCH, num_cpus=0.5
    )
    # Few shuffle partitions: each is a task, and the rows are tiny (a header each).
    partitions = max(1, min(len(refs) // GROUP_PARTITION_ROWS + 1, 64))
    return probes.groupby("group", num_partitions=partitions).map_groups(
        _assemble_group, batch_format="pyarrow", num_cpus=0.5
    )


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
    progress=print,
) -> ScanSummary:
    """Scan the inputs on the current Ray cluster (ray.init() must have been called) into OUT/manifest/."""
    start = time.perf_counter()
    refs = list_objects(inputs, storage=storage, include=include, exclude=exclude)
    progress(f"listed {len(refs)} objects under {len(inputs)} input(s)")
    manifest_uri = join(out, "manifest")
    out_fs, out_path = filesystem_for(manifest_uri, storage)
    if out_fs.exists(out_path):
        out_fs.rm(out_path, recursive=True)  # a scan replaces the previous manifest as a whole
    out_fs.makedirs(out_path, exist_ok=True)
    if refs:
        arrow_fs, path = arrow_filesystem(manifest_uri, storage)
        cases_dataset(refs, storage=storage).write_parquet(path, filesystem=arrow_fs)
    table = read_manifest(out, storage=storage) if refs else manifest_table([])
    summary = summarize(table, objects=len(refs), seconds=time.perf_counter() - start, manifest_uri=manifest_uri)
    accounted = sum(len(u) for u in table.column("source_uris").to_pylist())
    if accounted != len(refs):  # an invariant: a mismatch is a bug, and it must be loud
        raise RuntimeError(f"scan accounted for {accounted} objects, listed {len(refs)}")
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
