"""SEGs stored to a PACS (outputs.dicomweb_store): STOW-RS of every committed SEG, and what the store
answered, as a Delta table of the catalog.

    OUT/catalog/stored/   one row per store attempt of a SEG            STORED_SCHEMA

A SEG is sent only once its cases row is committed (the store reads the cases table: a SEG of no
committed row is never sent), by `store_committed_segs` at the end of a job. What is pending: the
committed rows with a SEG (`seg_uri`) of whose (case_id, target, run_id) no row here says `stored`.
So a re-run sends nothing new, a store that failed is tried again by the next run, and a pair redone
(a grown series, a retried failure) is sent again as its new SEG. The SEG's UIDs are derived from
(case, target, configuration, instance set) (outputs/dicom_seg.seg_uids): a SEG sent twice (a crash
between the STOW and its row here) is the same instance to the PACS, never a second SEG.

Rows hold no patient data and no credentials: the store's URI as configured (dicomweb://HOST/PATH, no
user information: io/dicomweb refuses it), the SEG's UIDs, the HTTP status and the store's failure
reason code (PS3.18 FailureReason) or the client's error text.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from mcs_batch.io import dicomweb
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.outputs.delta import TABLE_PROPERTIES, TableSpec, delta_options, open_table, table_uri, with_retries

STORED_DIR = "catalog/stored"
STORED_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),  # the run of the cases row whose SEG this is
        pa.field("seg_uri", pa.string()),
        pa.field("sop_instance_uid", pa.string()),  # of the SEG
        pa.field("series_instance_uid", pa.string()),  # of the SEG
        pa.field("store_uri", pa.string()),  # outputs.dicomweb_store
        pa.field("status", pa.string()),  # stored | failed
        pa.field("seg_stored_at", pa.timestamp("us", tz="UTC")),  # when the store accepted it (null: failed)
        pa.field("http_status", pa.int32()),
        pa.field("error_code", pa.string()),  # store_refused | store_unavailable | seg_unreadable
        pa.field("error_message", pa.string()),
        pa.field("stored_by", pa.string()),  # the run that sent it
        pa.field("attempted_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"mcs_batch.table": "stored", "mcs_batch.schema_version": "1"},
)
STORED = TableSpec("stored", STORED_DIR, STORED_SCHEMA)
STORE_THREADS = 4  # SEGs sent at once (the session's pool bounds the connections too)


def stored_table(out: str, storage: StorageOptions | None, *, version=None):
    """The stored table (deltalake.DeltaTable), or None when nothing was ever stored from OUT."""
    return open_table(out, STORED, storage, version=version)


def pending_segs(catalog) -> list[dict]:
    """Committed cases rows with a SEG that no `stored` row covers: case_id, target, run_id, seg_uri."""
    from mcs_batch.outputs.catalog import CASES

    cases = catalog.read(CASES, ["case_id", "target", "run_id", "seg_uri"])
    cases = cases.filter(pc.is_valid(cases.column("seg_uri")))
    done: set[tuple] = set()
    dt = stored_table(catalog.out, catalog.storage)
    if dt is not None:
        table = dt.to_pyarrow_table(columns=["case_id", "target", "run_id", "status"])
        done = {(r["case_id"], r["target"], r["run_id"]) for r in table.to_pylist() if r["status"] == "stored"}
    rows = [r for r in cases.to_pylist() if (r["case_id"], r["target"], r["run_id"]) not in done]
    return sorted(rows, key=lambda r: (r["case_id"], r["target"]))


def _failure_reason(response) -> str | None:
    """The first FailureReason of a STOW-RS response dataset (PS3.18 Table 10.5.3-1), or None."""
    failed = response.get("FailedSOPSequence") if response is not None else None
    if not failed:
        return None
    reason = failed[0].get("FailureReason")
    return f"FailureReason {int(reason):#06x}" if reason is not None else "FailedSOPSequence without a reason"


def store_one(row: dict, *, store_uri: str, storage: StorageOptions | None, run_id: str) -> dict:
    """STOW-RS of one SEG: its `stored` row (never raises)."""
    import pydicom

    now = datetime.now(UTC)
    out = {**{k: row[k] for k in ("case_id", "target", "run_id", "seg_uri")}, "store_uri": store_uri,
           "stored_by": run_id, "attempted_at": now, "status": "failed"}  # fmt: skip
    try:
        fs, path = filesystem_for(row["seg_uri"], storage)
        seg = pydicom.dcmread(io.BytesIO(fs.cat_file(path)))
        out.update(sop_instance_uid=str(seg.SOPInstanceUID), series_instance_uid=str(seg.SeriesInstanceUID))
    except Exception as e:
        return {**out, "error_code": "seg_unreadable", "error_message": dicomweb.describe(e)}
    client = dicomweb.client_for(dicomweb.parse_uri(store_uri).base_url, storage.dicomweb if storage else None)
    try:
        response = client.store_instances([seg])
    except Exception as e:
        status = dicomweb.http_status(e)
        permanent = status is not None and 400 <= status < 500 and status not in (408, 429)
        return {**out, "http_status": status, "error_code": "store_refused" if permanent else "store_unavailable",
                "error_message": f"{store_uri}: STOW-RS failed ({dicomweb.describe(e)})"}  # fmt: skip
    reason = _failure_reason(response)
    if reason is not None:
        return {**out, "http_status": 200, "error_code": "store_refused",
                "error_message": f"{store_uri}: the store refused the SEG ({reason})"}  # fmt: skip
    return {**out, "status": "stored", "http_status": 200, "seg_stored_at": datetime.now(UTC)}


def append_stored(out: str, rows: list[dict], *, storage: StorageOptions | None, run_id: str) -> None:
    """Append store results to OUT/catalog/stored (created by the first)."""
    if not rows:
        return
    from deltalake import CommitProperties, write_deltalake

    table = pa.Table.from_pylist(rows, schema=STORED.arrow_schema())
    uri = table_uri(out, STORED)
    options = delta_options(uri, storage)
    metadata = CommitProperties(custom_metadata={"mcs_batch.run_id": run_id})

    def commit() -> None:
        write_deltalake(uri, table, mode="append", name="stored", storage_options=options,
                        commit_properties=metadata, configuration=TABLE_PROPERTIES)  # fmt: skip

    with_retries(commit, what="the stored table")


def store_committed_segs(catalog, store_uri: str, *, run_id: str, threads: int = STORE_THREADS) -> dict:
    """Send every pending SEG (`pending_segs`) to `store_uri` by STOW-RS, a few at once, and record
    each answer. Returns counts: pending, stored, failed (by error code), seconds."""
    start = time.perf_counter()
    rows = pending_segs(catalog)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda r: store_one(r, store_uri=store_uri, storage=catalog.storage,
                                                    run_id=run_id), rows))  # fmt: skip
    append_stored(catalog.out, results, storage=catalog.storage, run_id=run_id)
    failed: dict[str, int] = {}
    for r in results:
        if r["status"] != "stored":
            failed[r["error_code"]] = failed.get(r["error_code"], 0) + 1
    return {"pending": len(rows), "stored": sum(r["status"] == "stored" for r in results), "failed": failed,
            "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
