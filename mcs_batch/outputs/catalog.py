"""The output folder: its Delta tables, masks and run records, on local disk and on object storage alike.

    OUT/catalog/cases/        Delta table, one row per (case, target)          (outputs/delta.py)
    OUT/catalog/slices/       Delta table, one row per (case, target, slice)
    OUT/catalog/evaluation/   Delta table, written by `mcs-batch evaluate`
    OUT/masks/<case_id>/<target>.nii.gz (+ .png for 2D images, .seg.dcm with outputs.dicom_seg)
    OUT/runs/<run_id>.json    what each run did (outputs/runs.py), with the table versions it produced
    OUT/locks/run-<run_id>.json  each live run's heartbeat (outputs/lease.py)
    OUT/staging/<run_id>/     a job's listing waves and slice parts (never the catalog's)
    OUT/index/                the archive index, a Delta table too (outputs/index.py)

A commit (one flush of the job's writer) is two Delta commits:
  1. the slices of the flush's ok cases, appended to the slices table;
  2. the cases rows, merged into the cases table on (case_id, target): a pair not in the table is
     inserted; a pair already there is left as it is, unless the row names (`_replaces`) the run of
     the row it replaces and that row is still there (a retried failure, a grown series). So each
     pair has one row whatever the interleaving of writers, and a writer that lost a race to a pair
     loses only its work.
A (case, target) is committed when its cases row is. Masks are written before any of it. Slice rows
of a pair whose cases row is not (or no longer) the one of their run (a crash between 1 and 2, a lost
race, a superseded row) are not part of the catalog: `committed_slices` and the `slices` view of
`mcs-batch query` join them to cases on (case_id, target, run_id), and compaction removes them.

What a merge reads. A plain merge reads every row of the cases table to find the pairs it commits: its
cost grows with the catalog (bench/catalog_bench.py: 0.7 / 2.2 s of CPU per 2,048-case commit at
200,000 / 1 million pairs; through the window 0.2 s). The job's writer knows more: its grouper read
the committed pairs at the job's start, so a pair its commit can find in the table is either a row it
names (`_replaces`, `_absorbs`) or a row another job committed since: a job that started after it, or
one that was running then. Run ids begin with their start
time (UTC, %Y%m%dT%H%M%SZ), so the writer passes a CommitWindow: runs started since its own start less
COMMIT_WINDOW_MARGIN_S (clock skew between drivers), and the runs whose heartbeats were under OUT/locks
at its start. The merge predicate says so on run_id, whose statistics every data file carries: Delta
skips every other file, and a concurrent commit in the window still conflicts with the merge as before.
Callers that have not judged the committed pairs (refinement) merge against the whole table.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mcs_batch.errors import TRANSIENT_CODES, ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, native_arrow_filesystem, to_uri
from mcs_batch.outputs.delta import (
    TABLE_PROPERTIES,
    TableSpec,
    check_writable,
    delta_options,
    open_table,
    table_uri,
    with_retries,
)
from mcs_batch.outputs.runs import RUNS_DIR
from mcs_batch.outputs.schema import CASES_SCHEMA, EVALUATION_SCHEMA, SLICES_SCHEMA, table_from_rows
from mcs_batch.records import make_case_id

CASES_DIR, SLICES_DIR, EVALUATION_DIR = "catalog/cases", "catalog/slices", "catalog/evaluation"
MASKS_DIR = "masks"
STAGING_DIR = "staging"  # per run: listing waves, slice parts, local temporaries
SHARED_TMP = "tmp"  # staging/tmp: temporaries of writers that are not a job (evaluate, scan, heartbeats)
STALE_TMP_S = 600  # a shared temporary older than this belongs to a dead writer
CASES = TableSpec("cases", CASES_DIR, CASES_SCHEMA)
SLICES = TableSpec("slices", SLICES_DIR, SLICES_SCHEMA)
EVALUATION = TableSpec("evaluation", EVALUATION_DIR, EVALUATION_SCHEMA)
TABLES = (CASES, SLICES, EVALUATION)
REPLACES = "_replaces"  # in a commit's case rows only: the run of the row this one replaces
# In a commit's case rows only (JSON {case_id: run_id}): failure rows of this row's objects as cases of
# their own (an object storage failed to read, or read as broken, in an earlier run), which the commit
# deletes: the object is now part of this case (a series), and no object is in two rows.
ABSORBS = "_absorbs"
_ABSORBED = "_absorbed"  # merge source only: the run of a failure row the commit deletes
PAIR = "t.case_id = s.case_id AND t.target = s.target"
COMMIT_WINDOW_MARGIN_S = 3600.0  # a commit's window starts this long before its job did (module docstring)
RUN_ID_TIME = "%Y%m%dT%H%M%SZ"  # how a run id begins (new_run_id)


def new_run_id(kind: str = "") -> str:
    """A new run's id: its start time (RUN_ID_TIME, which CommitWindow compares), then kind and a nonce."""
    return datetime.now(UTC).strftime(RUN_ID_TIME) + (f"-{kind}" if kind else "") + "-" + uuid.uuid4().hex[:6]


COMMITTED_COLUMNS = ["case_id", "target", "status", "error_code", "error_message", "run_id", "attempts", "history",
                     "retryable", "instances"]  # fmt: skip


def stamp_attempts(row: dict, previous: tuple[int, list[str]] | None, max_attempts: int) -> None:
    """A case row's attempts, history and whether a later run retries it: a failure with a transient
    code and attempts to spare (errors.TRANSIENT_CODES, failure_budget.transient_attempts). `previous`:
    (attempts so far, their outcomes) of the row this one replaces, if any."""
    attempts, history = previous or (0, [])
    row["attempts"], row["history"] = attempts + 1, list(history)
    row["retryable"] = bool(row["status"] == "failed" and row.get("error_code") in TRANSIENT_CODES
                            and row["attempts"] < max_attempts)  # fmt: skip


def quote(value: str) -> str:
    """A SQL string literal (delta-rs predicates)."""
    return "'" + str(value).replace("'", "''") + "'"


@dataclass
class CommitResult:
    inserted: int = 0  # pairs new to the catalog
    replaced: int = 0  # pairs whose row this commit replaced (retried failures, grown series)
    dropped: int = 0  # pairs another writer committed first: this commit's rows for them were dropped
    versions: dict[str, int] | None = None  # table -> version after the commit


class Catalog:
    """Reads and commits the outputs under OUT (a local folder or an object-store prefix)."""

    def __init__(self, out: str, *, storage: StorageOptions | None = None, owner: str = ""):
        """`owner`: the run id of the job writing through this catalog (its temporaries go to
        OUT/staging/<owner>/); empty for other writers."""
        if not out:
            raise ConfigError("outputs.uri (--out) is required")
        self.out = out
        self.storage = storage
        self.owner = owner
        self.fs, self.root = filesystem_for(out, storage)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = "file" in protocols
        self.commits = 0  # commits made through this object
        self._open: dict[str, object] = {}  # table name -> its DeltaTable, brought up to date on each use
        self.crash_hook: Callable[[str], None] | None = None  # test-only fault injection (faults.py)

    # -- paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        return to_uri(self.fs, self.path(*parts))

    def mask_paths(self, case_id: str, target: str) -> tuple[str, str]:
        """(NIfTI path, PNG path) of a mask; built from the case id and target name only."""
        base = self.path(MASKS_DIR, case_id, target)
        return base + ".nii.gz", base + ".png"

    def seg_path(self, case_id: str, target: str) -> str:
        """Path of a mask's DICOM SEG (beside its NIfTI); built from the case id and target name only."""
        return self.path(MASKS_DIR, case_id, target) + ".seg.dcm"

    def _crash(self, point: str) -> None:
        if self.crash_hook:
            self.crash_hook(point)

    # -- atomic writes of files (masks, run records, reports) ---------------------------------------
    def write_bytes(self, path: str, data: bytes, *, crash_point: str = "", shared_tmp: bool = False) -> None:
        """Atomically: readers see the old object or the whole new one, never a part. Local
        temporaries live under OUT/staging (never beside the file), so a crash leaves none in the
        folders readers scan: the owner run's staging, or the shared one (`shared_tmp`: for writes that
        may come after the run removed its staging, as its heartbeat's)."""
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp_dir = self.path(STAGING_DIR, SHARED_TMP if shared_tmp else self.owner or SHARED_TMP, "tmp")
            os.makedirs(tmp_dir, exist_ok=True)
            tmp = posixpath.join(tmp_dir, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with open(tmp, "wb") as f:
                if crash_point and self.crash_hook:  # test-only: a crash half-way
                    f.write(data[: len(data) // 2])
                    f.flush()
                    self._crash(crash_point)
                    f.seek(0)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # a single PUT is atomic on S3-compatible stores

    # -- the tables --------------------------------------------------------------------------------
    def table(self, spec: TableSpec, *, version: int | str | None = None):
        """The Delta table (deltalake.DeltaTable) at its latest version (or as of `version`), or None
        when nothing was ever committed to it. The latest is kept open and brought up to date with the
        log entries written since (no re-read of the whole log)."""
        if version is not None:
            return open_table(self.out, spec, self.storage, version=version)
        dt = self._open.get(spec.name)
        if dt is not None:
            dt.update_incremental()
            return dt
        dt = open_table(self.out, spec, self.storage)
        if dt is not None:
            self._open[spec.name] = dt
        return dt

    def exists(self) -> bool:
        """Whether OUT holds a catalog (a cases table)."""
        return self.table(CASES) is not None

    def dataset(self, spec: TableSpec, *, version: int | str | None = None):
        """A pyarrow dataset of the table's snapshot: exactly the data files its log names (the log read,
        no listing), in the current schema (columns older files lack read as null), through pyarrow's own
        filesystem: what DuckDB and `query` read. None when the table does not exist."""
        import pyarrow.dataset as pads

        dt = self.table(spec, version=version)
        if dt is None:
            return None
        fs, root = native_arrow_filesystem(self.out, self.storage)
        folder = posixpath.join(root, spec.folder)
        paths = pa.table(dt.get_add_actions(flatten=True)).column("path").to_pylist()
        files = [posixpath.join(folder, p) for p in paths]
        return pads.dataset(files, schema=as_views(spec.arrow_schema()), format="parquet", filesystem=fs)

    def read(self, spec: TableSpec, columns: list[str] | None = None, *, version: int | str | None = None,
             filter=None) -> pa.Table:  # fmt: skip
        """The table's current snapshot (or as of `version`): only `columns`, rows passing `filter` (a
        pyarrow expression, pushed down to the files' statistics). Empty with the schema when absent."""
        dataset = self.dataset(spec, version=version)
        if dataset is None:
            schema = spec.schema if columns is None else pa.schema([spec.schema.field(c) for c in columns])
            return schema.empty_table()
        wanted = columns or spec.schema.names
        table = dataset.to_table(columns=wanted, filter=filter)  # columns older files lack: null
        return table.cast(pa.schema([spec.schema.field(c) for c in wanted]))


    def cases(self, columns: list[str] | None = None, *, version: int | str | None = None) -> pa.Table:
        return self.read(CASES, columns, version=version)

    def slices(self, columns: list[str] | None = None, *, version: int | str | None = None) -> pa.Table:
        """The committed slice rows: those of the run whose cases row holds the pair."""
        keys = ["case_id", "target", "run_id"]
        wanted = columns or SLICES_SCHEMA.names
        table = self.read(SLICES, list(dict.fromkeys([*wanted, *keys])), version=version)
        committed = self.read(CASES, keys, version=version)
        # joined on the keys alone (Arrow's join carries no nested columns, such as boxes), then taken
        rows = table.select(keys).append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        kept = np.sort(rows.join(committed, keys=keys, join_type="left semi").column("_row").to_numpy())
        return table.take(pa.array(kept, pa.int64())).select(wanted)

    def evaluation(self, columns: list[str] | None = None, *, version: int | str | None = None) -> pa.Table:
        return self.read(EVALUATION, columns, version=version)

    def versions(self) -> dict[str, int]:
        """table -> its current version (tables never written are left out)."""
        out = {}
        for spec in TABLES:
            dt = self.table(spec)
            if dt is not None:
                out[spec.name] = dt.version()
        return out

    def committed(self) -> dict[tuple[str, str], str]:
        """(case_id, target) -> status of every committed pair."""
        table = self.cases(["case_id", "target", "status"])
        return dict(zip(zip(table.column("case_id").to_pylist(), table.column("target").to_pylist(), strict=True),
                        table.column("status").to_pylist(), strict=True))  # fmt: skip

    def committed_state(self) -> pa.Table:
        """What a job's grouper needs at its start to tell which pairs are done and which to redo:
        COMMITTED_COLUMNS of every row (one read of the snapshot, those columns only)."""
        return self.cases(COMMITTED_COLUMNS)

    def config_hashes(self) -> set[str]:
        """Config hashes of the segmentation rows. Derived targets (`<target>@<kind>`, e.g. refined
        masks of `train/weak`) carry their own configuration and are left out."""
        table = self.cases(["target", "config_hash"])
        targets, hashes = table.column("target").to_pylist(), table.column("config_hash").to_pylist()
        return {h for t, h in zip(targets, hashes, strict=True) if h and "@" not in t}

    def check_writable(self) -> None:
        """ConfigError (nothing written) when this release cannot write one of OUT's tables."""
        for spec in TABLES:
            dt = self.table(spec)
            if dt is not None:
                check_writable(dt, spec, self.out)

    # -- committing --------------------------------------------------------------------------------
    def commit(self, run_id: str, seq: int, case_rows: Iterable[dict], slice_rows: Iterable[dict] | pa.Table,
               *, window: CommitWindow | None = None) -> CommitResult:  # fmt: skip
        """Commit finished cases: their slice rows appended, then their case rows merged (module
        docstring). Each row may carry `_replaces`: the run id of the committed row it replaces.
        Idempotent per (run_id, seq): a retried commit appends its slices once (Delta app
        transactions) and merges nothing twice. window: the merge reads only the rows of the window's
        runs and those the commit names (module docstring, "What a merge reads"); None: all."""
        from deltalake import CommitProperties, Transaction, write_deltalake

        case_rows = list(case_rows)
        if not case_rows:
            return CommitResult()
        if not isinstance(slice_rows, pa.Table):
            slice_rows = table_from_rows(list(slice_rows), SLICES_SCHEMA)
        metadata = {"mcs_batch.run_id": run_id, "mcs_batch.seq": str(seq)}
        versions = {}
        if slice_rows.num_rows:
            app = f"{run_id}/slices"

            def append_slices() -> int:
                dt = self.table(SLICES)
                done = dt.transaction_version(app) if dt is not None else None
                if done is not None and done >= seq:
                    return dt.version()  # this commit's slices are in already (a retry after an ambiguous failure)
                write_deltalake(dt or table_uri(self.out, SLICES), slice_rows.cast(SLICES.arrow_schema()),
                                mode="append", schema_mode="merge",
                                storage_options=delta_options(self.out, self.storage),
                                **_new_table(SLICES, dt), commit_properties=CommitProperties(
                                    custom_metadata=metadata, app_transactions=[Transaction(app, seq)]))  # fmt: skip
                return self.table(SLICES).version()

            versions["slices"] = with_retries(append_slices, what=f"commit {seq} of run {run_id}: slices")
        self._crash("slices_committed")
        result = with_retries(lambda: self._merge_cases(case_rows, metadata, window),
                              what=f"commit {seq} of run {run_id}: cases")  # fmt: skip
        result.versions = {**versions, **(result.versions or {})}
        self._crash("cases_committed")
        self.commits += 1
        return result

    def _merge_cases(self, rows: list[dict], metadata: dict, window: CommitWindow | None = None) -> CommitResult:
        from deltalake import CommitProperties, write_deltalake

        extra = [REPLACES, _ABSORBED]
        schema = CASES.arrow_schema().append(pa.field(REPLACES, pa.string())).append(pa.field(_ABSORBED, pa.string()))
        absorbed = [{"case_id": case_id, "target": row["target"], "kind": "", "status": "", _ABSORBED: run}
                    for row in rows if row.get(ABSORBS)
                    for case_id, run in json.loads(row[ABSORBS]).items()]  # fmt: skip
        source = table_from_rows(rows + absorbed, schema)
        dt = self.table(CASES)
        if dt is None:  # the first commit creates the table (a concurrent first commit: retried as a merge)
            try:
                first = source.filter(pc.field(_ABSORBED).is_null()).drop_columns(extra)
                write_deltalake(table_uri(self.out, CASES), first, mode="error",
                                storage_options=delta_options(self.out, self.storage), **_new_table(CASES, None),
                                commit_properties=CommitProperties(custom_metadata=metadata))  # fmt: skip
            except Exception:
                if self.table(CASES) is None:
                    raise
                return self._merge_cases(rows, metadata)  # another writer created it first
            return CommitResult(inserted=first.num_rows, versions={"cases": self.table(CASES).version()})
        predicate = PAIR + _window(window, rows, absorbed)
        merger = dt.merge(source, predicate, source_alias="s", target_alias="t", streamed_exec=False, merge_schema=True,
                          commit_properties=CommitProperties(custom_metadata=metadata))  # fmt: skip
        # a failure row the commit absorbs, if it is still the one its new case was judged against
        merger = merger.when_matched_delete(
            predicate=f"s.{_ABSORBED} IS NOT NULL AND t.run_id = s.{_ABSORBED} AND t.status = 'failed'")
        replace = f"s.{_ABSORBED} IS NULL AND s.{REPLACES} IS NOT NULL AND t.run_id = s.{REPLACES}"
        merger = merger.when_matched_update_all(predicate=replace, except_cols=extra)  # the row it replaces is there
        metrics = merger.when_not_matched_insert_all(predicate=f"s.{_ABSORBED} IS NULL", except_cols=extra).execute()
        inserted, replaced = int(metrics["num_target_rows_inserted"]), int(metrics["num_target_rows_updated"])
        return CommitResult(inserted, replaced, len(rows) - inserted - replaced, {"cases": dt.version()})

    def replace_evaluation(self, dataset: str, target: str, table: pa.Table) -> None:
        """The evaluation rows of (dataset, target), replaced as a whole in one commit."""
        from deltalake import write_deltalake

        def write():
            dt = self.table(EVALUATION)
            predicate = f"dataset = {quote(dataset)} AND target = {quote(target)}"
            options = delta_options(self.out, self.storage)
            write_deltalake(dt or table_uri(self.out, EVALUATION), table.cast(EVALUATION.arrow_schema()),
                            mode="overwrite" if dt is not None else "append",
                            predicate=predicate if dt is not None else None, storage_options=options,
                            **_new_table(EVALUATION, dt))  # fmt: skip

        with_retries(write, what=f"evaluation of {dataset}/{target}")

    # -- run records -------------------------------------------------------------------------------
    def write_run(self, run_id: str, document: dict) -> str:
        path = self.path(RUNS_DIR, f"{run_id}.json")
        self.write_bytes(path, json.dumps(document, indent=2, default=str).encode())
        return to_uri(self.fs, path)

    def running_records(self) -> list[str]:
        """Run ids whose record still says "running"."""
        from mcs_batch.outputs.runs import list_runs

        return [r.run_id for r in list_runs(self) if r.status == "running"]

    def close_run(self, run_id: str, *, reason: str) -> None:
        """Mark the record of a run whose driver died as failed."""
        from mcs_batch.outputs.runs import read_run

        record = read_run(self, run_id)
        if record is not None and record.status == "running":
            self.write_run(run_id, record.document | {"status": "failed", "reason": reason})

    def staging_runs(self) -> list[str]:
        """Runs with a staging folder (scan's own folders, `scan-*`, and the shared tmp are not runs)."""
        try:
            entries = self.fs.ls(self.path(STAGING_DIR), detail=False)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e.rstrip("/")) for e in entries)
        return sorted(n for n in names if n and n != SHARED_TMP and not n.startswith("scan-"))

    def remove_staging(self, run: str) -> None:
        """A run's staging folder (its waves, slice parts, temporaries); never raises."""
        try:
            self.fs.rm(self.path(STAGING_DIR, run), recursive=True)
        except Exception:
            return

    def remove_stale_temporaries(self) -> list[str]:
        shared = self.path(STAGING_DIR, SHARED_TMP, "tmp")
        removed = []
        if self.local and os.path.isdir(shared):
            for name in os.listdir(shared):
                path = os.path.join(shared, name)
                if time.time() - os.path.getmtime(path) > STALE_TMP_S:
                    os.remove(path)
                    removed.append(name)
        return removed


def _view(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string(t):
        return pa.string_view()
    if pa.types.is_list(t):
        return pa.list_(_view(t.value_type))
    return t


def as_views(schema: pa.Schema) -> pa.Schema:
    """The schema with string columns as string_view: how delta-rs' merge and compaction write them (its
    other writes: as string), so that a dataset over files of both kinds takes DuckDB's filters (string
    view literals) on every file. Readers of tables (Catalog.read) get plain strings back."""
    return pa.schema([pa.field(f.name, _view(f.type), f.nullable, f.metadata) for f in schema])


@dataclass(frozen=True)
class CommitWindow:
    """The runs whose rows a job's commits can meet (module docstring, "What a merge reads"): those that
    started at `since` (a run id's leading time) or later, and `runs`, running at the job's start."""

    since: str
    runs: tuple[str, ...] = ()

    @classmethod
    def from_start(cls, started: float, running: Iterable[str]) -> CommitWindow:
        """The window of a job that started at `started` (epoch seconds), when `running` were alive."""
        since = datetime.fromtimestamp(started - COMMIT_WINDOW_MARGIN_S, UTC).strftime(RUN_ID_TIME)
        return cls(since, tuple(sorted(running)))


def _window(window: CommitWindow | None, rows: list[dict], absorbed: list[dict]) -> str:
    """The merge predicate's part that limits what it reads: rows of the window's runs and of the runs
    the commit names; "" to read the whole table."""
    if window is None:
        return ""
    named = {str(r[REPLACES]) for r in rows if r.get(REPLACES)} | {str(r[_ABSORBED]) for r in absorbed}
    runs = sorted(set(window.runs) | named)
    listed = f" OR t.run_id IN ({', '.join(quote(r) for r in runs)})" if runs else ""
    return f" AND (t.run_id >= {quote(window.since)}{listed})"


def _new_table(spec: TableSpec, dt) -> dict:
    """write_deltalake arguments that create the table when it does not exist yet."""
    if dt is not None:
        return {}
    return {"partition_by": list(spec.partition_by) or None, "name": spec.name,
            "description": f"mcs-batch {spec.name} (schema {spec.version})",
            "configuration": TABLE_PROPERTIES}  # fmt: skip


def committed_pairs(table: pa.Table) -> set[tuple[str, str]]:
    return set(zip(table.column("case_id").to_pylist(), table.column("target").to_pylist(), strict=True))


def ok_filter():
    return pc.field("status") == "ok"


class CommittedPairs:
    """The catalog's rows as a job's grouper judges them, read once at its start (committed_state):
    which targets of a case are done, and which to redo, replacing their row (`redo`):

    - ok and skipped rows are done; a DICOM series whose instance set changed since (files arrived or
      left) is redone for every target, replacing its rows, whatever their status;
    - failed rows are done, except transient failures with attempts to spare (failure_budget) and,
      with --retry-failed, every failure: those are redone, their attempts and history carried on.

    Rows are kept as sorted arrays (a case's rows found by binary search), not as Python objects per
    pair: a year of nightly runs is millions of pairs in the grouper's memory.
    """

    def __init__(self, table: pa.Table, *, max_attempts: int, retry_failed: bool = False):
        self.max_attempts, self.retry_failed = max_attempts, retry_failed
        self.table = table.sort_by([("case_id", "ascending"), ("target", "ascending")])
        ids = self.table.column("case_id").to_numpy(zero_copy_only=False)
        width = max((len(i) for i in ids), default=1)
        self.ids = ids.astype(f"S{width}") if len(ids) else np.array([], dtype="S1")

    def __len__(self) -> int:
        return self.table.num_rows

    def _rows(self, case_id: str) -> list[dict]:
        key = case_id.encode()
        lo, hi = np.searchsorted(self.ids, key, "left"), np.searchsorted(self.ids, key, "right")
        return self.table.slice(int(lo), int(hi - lo)).to_pylist() if hi > lo else []

    def judge(self, case_id: str, instances: str | None, targets: frozenset[str]) -> tuple[set[str], dict, bool]:
        """(targets done, redo: target -> {replaces, attempts, history}, grown: a series redone)."""
        done: set[str] = set()
        redo: dict[str, dict] = {}
        rows = [r for r in self._rows(case_id) if r["target"] in targets]
        grown = any(r["instances"] is not None and instances is not None and r["instances"] != instances
                    for r in rows)  # fmt: skip
        for row in rows:
            if grown:
                redo[row["target"]] = {"replaces": row["run_id"], "attempts": 0, "history": []}
            elif row["status"] != "failed":
                done.add(row["target"])
            elif self._again(row):
                attempts = row["attempts"] or 1  # rows of catalogs before schema 3 count as one attempt
                outcome = f"attempt {attempts} ({row['run_id']}): {row['error_code']}: {row['error_message']}"
                redo[row["target"]] = {"replaces": row["run_id"], "attempts": attempts,
                                       "history": [*(row["history"] or []), outcome]}  # fmt: skip
            else:
                done.add(row["target"])
        return done, redo, grown

    def object_failures(self, record_case_id: str, keys: list[str], targets: frozenset[str]) -> dict[str, dict]:
        """target -> {case_id: run_id} of the failure rows of `keys` as cases of their own (an object
        whose read failed, or that read as broken, in an earlier run), other than the record's own:
        rows the record's commit absorbs (ABSORBS)."""
        out: dict[str, dict] = {}
        for key in keys:
            own = make_case_id(f"file:{key}")
            if own == record_case_id:
                continue
            for row in self._rows(own):
                if row["target"] in targets and row["status"] == "failed":
                    out.setdefault(row["target"], {})[own] = row["run_id"]
        return out

    def _again(self, row: dict) -> bool:
        transient = row["error_code"] in TRANSIENT_CODES and (row["attempts"] or 1) < self.max_attempts
        return self.retry_failed or transient
