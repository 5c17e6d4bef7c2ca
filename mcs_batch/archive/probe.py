"""Header probing of a block of listed objects (a Ray task each): what every object is.

An object whose probe result the index already holds (same size and version) is not read again. The
result of each object is a payload: a parsed DICOM header (to be grouped into a series) or a finished
case record (NIfTI, PNG/JPEG, anything unreadable or not an image), as JSON.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io import dicomweb
from mcs_batch.io.dicom_header import header_from_metadata, read_dicom_header
from mcs_batch.io.discover import ObjectRef, Probe, probe_object
from mcs_batch.io.storage import StorageOptions, filesystem_for, protocol_of
from mcs_batch.records import CaseKind, failed_record

IO_THREADS = 8  # concurrent header reads per task on object stores
log = logging.getLogger(__name__)
_said_no_series_metadata: set[str] = set()  # servers already said (once per process) to lack it


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
    if protocol_of(refs[0].uri) in dicomweb.SCHEMES:
        return [payload_of(p) for p in probe_dicomweb(refs, fs, threads=threads)]
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


def _instance_failure(ref: ObjectRef, code: ErrorCode, message: str) -> Probe:
    return Probe(ref, record=failed_record(f"file:{ref.rel}", CaseKind.UNKNOWN, ref.uri, ref.rel, code, message))


def _series_probes(refs: list[ObjectRef], fs) -> list[Probe]:
    """Headers of a series' instances from one WADO-RS series metadata request (no pixels). A server
    without series-level metadata: each instance retrieved whole and its header read (said once per
    server and process). A request that fails after the session's retries: every instance of the
    series fails `unreadable` (transient: the next run asks again)."""
    series_path = fs._strip_protocol(refs[0].uri).rsplit("/instances/", 1)[0]
    try:
        metadata = fs.series_metadata(series_path)
    except dicomweb.SeriesMetadataUnsupported as e:
        server = fs.location(series_path).base_url
        if server not in _said_no_series_metadata:
            _said_no_series_metadata.add(server)
            log.warning("%s: no series-level metadata (%s): headers read from whole instances", server, e)
        return [_whole_instance_probe(ref, fs) for ref in refs]
    except Exception as e:
        message = f"{fs.unstrip_protocol(series_path)}: cannot read series metadata ({dicomweb.describe(e)})"
        return [_instance_failure(ref, ErrorCode.UNREADABLE, message) for ref in refs]
    by_uid = {}
    for item in metadata:
        values = (item.get("00080018") or {}).get("Value") or []
        if values:
            by_uid[str(values[0])] = item
    probes = []
    for ref in refs:
        item = by_uid.get(ref.uri.rsplit("/", 1)[-1])
        if item is None:
            message = f"{ref.uri}: listed by QIDO-RS but absent from its series' metadata"
            probes.append(_instance_failure(ref, ErrorCode.UNREADABLE, message))
            continue
        try:
            probes.append(Probe(ref, header=header_from_metadata(item, uri=ref.uri, rel=ref.rel)))
        except CaseError as e:
            probes.append(_instance_failure(ref, e.code, e.message))
    return probes


def _whole_instance_probe(ref: ObjectRef, fs) -> Probe:
    try:
        data = fs.cat_file(fs._strip_protocol(ref.uri))
    except Exception as e:
        return _instance_failure(ref, ErrorCode.UNREADABLE, f"{ref.uri}: cannot retrieve ({dicomweb.describe(e)})")
    try:
        header = read_dicom_header(io.BytesIO(data), uri=ref.uri, rel=ref.rel, size=len(data))
    except CaseError as e:
        return _instance_failure(ref, e.code, e.message)
    header.bytes_read = len(data)
    return Probe(ref, header=header)


def probe_dicomweb(refs: list[ObjectRef], fs, *, threads: int) -> list[Probe]:
    """Probes of DICOMweb instances (io/dicomweb.py), in the order of `refs`: a metadata request per
    series, a few series at once (the session bounds the connections)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ref in enumerate(refs):
        groups[ref.uri.rsplit("/instances/", 1)[0]].append(i)
    batches = [[refs[i] for i in idx] for idx in groups.values()]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(batches)))) as pool:
        results = list(pool.map(lambda b: _series_probes(b, fs), batches))
    out: list[Probe | None] = [None] * len(refs)
    for idx, probes in zip(groups.values(), results, strict=True):
        for i, p in zip(idx, probes, strict=True):
            out[i] = p
    return out  # type: ignore[return-value]
