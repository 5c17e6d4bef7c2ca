"""Header probing of a block of listed objects (a Ray task each): what every object is.

An object whose probe result the index already holds (same size and version) is not read again. The
result of each object is a payload: a parsed DICOM header (to be grouped into a series) or a finished
case record (NIfTI, PNG/JPEG, anything unreadable or not an image), as JSON.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from mcs_batch.errors import ErrorCode
from mcs_batch.io.discover import ObjectRef, Probe, probe_object
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.records import CaseKind, failed_record

IO_THREADS = 8  # concurrent header reads per task on object stores


def probe_one(ref: ObjectRef, fs) -> Probe:
    """probe_object that never raises: a bug is recorded against the object, not the batch."""
    try:
        return probe_object(ref, fs=fs)
    except Exception as e:
        return Probe(ref, record=failed_record(
            f"file:{ref.rel}", CaseKind.UNKNOWN, ref.uri, ref.rel, ErrorCode.INTERNAL_ERROR,
            f"{ref.uri}: {type(e).__name__}: {e}",
        ))  # fmt: skip


def payload_of(probe: Probe) -> str:
    if probe.header is not None:
        return json.dumps({"header": probe.header.to_dict()})
    return json.dumps({"record": probe.record.to_row()})


def probe_refs(refs: list[ObjectRef], *, storage: StorageOptions | None, threads: int) -> list[str]:
    """Payloads of objects, read with a few concurrent requests (object stores answer with latency)."""
    if not refs:
        return []
    fs, _ = filesystem_for(refs[0].uri, storage)
    if threads > 1 and len(refs) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            probes = list(pool.map(lambda r: probe_one(r, fs), refs))
    else:
        probes = [probe_one(r, fs) for r in refs]
    return [payload_of(p) for p in probes]


def probe_block(table: pa.Table, *, storage: StorageOptions | None) -> pa.Table:
    """map_batches (pyarrow): fill `payload` for objects the index did not know; mark them `probed`."""
    payloads = table.column("payload").to_pylist()
    todo = [i for i, p in enumerate(payloads) if not p]
    uris, rels, sizes = (table.column(c).to_pylist() for c in ("uri", "rel", "size"))
    refs = [ObjectRef(uri=uris[i], rel=rels[i], size=int(sizes[i])) for i in todo]
    threads = 1 if not refs or refs[0].uri.startswith("file://") else IO_THREADS
    for i, payload in zip(todo, probe_refs(refs, storage=storage, threads=threads), strict=True):
        payloads[i] = payload
    probed = [False] * len(payloads)
    for i in todo:
        probed[i] = True
    table = table.set_column(table.schema.get_field_index("payload"), "payload", pa.array(payloads, pa.string()))
    table = table.append_column("probed", pa.array(probed, pa.bool_()))
    return table.append_column("probed_at", pa.array([time.time()] * len(payloads), pa.float64()))
