"""The output folder and its commit protocol, on local disk and on object storage alike.

    OUT/runs/<run_id>.json
    OUT/catalog/cases/part-<run_id>-<seq>.parquet     ok / skipped rows: a commit of those cases
    OUT/catalog/cases/failed-<run_id>-<seq>.parquet   failed rows (dropped and redone by --retry-failed)
    OUT/catalog/slices/part-<run_id>-<seq>.parquet    slice rows of the cases committed by the same seq
    OUT/masks/<case_id>/<target>.nii.gz (+ .png for 2D images)
    OUT/locks/writer-<gen>.json         the writer lease: one job writes an OUT at a time (outputs/lease.py)
    OUT/staging/<run_id>/               a job's listing waves, slice parts, commits being published and
                                        local temporary files; removed at its end or by the next repair
    OUT/index/                          the archive index (mcs_batch.outputs.index)

Readers (pandas, DuckDB, Spark, Ray Data, `mcs-batch query`) scan catalog/cases and catalog/slices,
where nothing uncommitted is ever written. A commit:
  1. writes its parts (slices, cases, failed) complete under OUT/staging/<run_id>/commits/;
  2. writes the commit's intent, a small JSON naming them, in the same folder: the commit point;
  3. publishes: moves the slices part, then the cases parts, into catalog/ (local: rename; object
     stores: copy then delete), then deletes the intent.
Masks are written (atomically) before step 1. A crash before step 2 leaves only staging, which the
next run's `repair` deletes (those cases are redone); a crash after it leaves an intent that `repair`
publishes to the end (those cases stay done). So every part in catalog/ belongs to a commit, no pair is
ever committed twice, and a (case, target) row implies its slice rows and masks. The one window readers
can notice is inside step 3: a commit's slice rows may appear a moment before its case rows (after a
crash there, until the next run or `mcs-batch repair` finishes the publish), never the reverse.

Every file is written atomically (local: a temporary file under OUT/staging, fsync, then rename; object
stores: one PUT), and `repair` runs only under the writer lease, so it never touches a live run's files.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from mcs_batch.errors import TRANSIENT_CODES, ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, to_uri
from mcs_batch.outputs.schema import CASES_SCHEMA, SLICES_SCHEMA, table_from_rows

CASES_DIR, SLICES_DIR, MASKS_DIR, RUNS_DIR = "catalog/cases", "catalog/slices", "masks", "runs"
STAGING_DIR = "staging"  # per run: listing waves, slice parts, commits being published, temporaries
SHARED_TMP = "tmp"  # staging/tmp: temporaries of writers that are not a job (evaluate, scan)
STALE_TMP_S = 600  # a shared temporary older than this belongs to a dead writer
COMMITS = "commits"  # staging/<run_id>/commits: parts and intents of commits being published
EVALUATION_DIR = "catalog/evaluation"  # written by mcs_batch.eval.evaluate


def stamp_attempts(row: dict, taken: dict[tuple[str, str], tuple[int, list[str]]], max_attempts: int) -> None:
    """A case row's attempts, history and whether a later run retries it: a failure with a transient
    code and attempts to spare (errors.TRANSIENT_CODES, failure_budget.transient_attempts)."""
    attempts, history = taken.get((row["case_id"], row["target"]), (0, []))
    row["attempts"], row["history"] = attempts + 1, list(history)
    row["retryable"] = bool(row["status"] == "failed" and row.get("error_code") in TRANSIENT_CODES
                            and row["attempts"] < max_attempts)  # fmt: skip


class Catalog:
    """Reads and commits the outputs under OUT (a local folder or an object-store prefix)."""

    def __init__(self, out: str, *, storage: StorageOptions | None = None, owner: str = ""):
        """`owner`: the run id of the job writing through this catalog (its temporaries and commits go
        to OUT/staging/<owner>/); empty for other writers."""
        if not out:
            raise ConfigError("outputs.uri (--out) is required")
        self.out = out
        self.storage = storage
        self.owner = owner
        self.fs, self.root = filesystem_for(out, storage)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = "file" in protocols
        self.lease = None  # a WriterLease: checked before every commit when set
        self.commits = 0  # commits made through this object
        self.crash_hook: Callable[[str], None] | None = None  # test-only fault injection (faults.py)

    # -- paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        return to_uri(self.fs, self.path(*parts))

    def _list(self, folder: str) -> list[str]:
        """The Parquet files of a catalog folder, as readers see them (hidden names skipped)."""
        try:
            names = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(p for p in names if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))

    def _crash(self, point: str) -> None:
        if self.crash_hook:
            self.crash_hook(point)

    # -- atomic writes -----------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes, *, crash_point: str = "", beside: bool = False) -> None:
        """Atomically: readers see the old object or the whole new one, never a part. Local
        temporaries live under OUT/staging (never beside the file), so a crash leaves none in the
        folders readers scan; `beside` puts it next to the file (for folders no reader lists)."""
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp_dir = posixpath.dirname(path) if beside else self.path(STAGING_DIR, self.owner or SHARED_TMP, "tmp")
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

    def write_table(self, path: str, table: pa.Table, *, crash_point: str = "") -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(path, sink.getvalue().to_pybytes(), crash_point=crash_point)

    # -- reading -----------------------------------------------------------------------------------
    def read_table(self, folder: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        tables = []
        for path in self._list(folder):
            with self.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns, schema=schema))
        if not tables:
            empty = schema if columns is None else pa.schema([schema.field(c) for c in columns])
            return empty.empty_table()
        return pa.concat_tables(tables)

    def cases(self, columns: list[str] | None = None) -> pa.Table:
        return self.read_table(CASES_DIR, CASES_SCHEMA, columns)

    def slices(self, columns: list[str] | None = None) -> pa.Table:
        return self.read_table(SLICES_DIR, SLICES_SCHEMA, columns)

    def evaluation(self, columns: list[str] | None = None) -> pa.Table:
        from mcs_batch.outputs.schema import EVALUATION_SCHEMA

        return self.read_table(EVALUATION_DIR, EVALUATION_SCHEMA, columns)

    def committed(self) -> dict[tuple[str, str], str]:
        """(case_id, target) -> status of every committed pair."""
        return self.committed_state()[0]

    def series_rows(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(case_id, target) -> (cases part holding the row, instance digest) for the rows of DICOM
        series (the cases whose instance set can grow): what a run that redoes a grown series
        supersedes. One entry per series and target, so small next to the catalog."""
        return self.committed_state()[1]

    def committed_state(self) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], tuple[str, str]]]:
        """(committed(), series_rows()) from one read of each cases part (what a job's grouper needs
        at its start); the two methods are views of it."""
        pairs: dict[tuple[str, str], str] = {}
        series: dict[tuple[str, str], tuple[str, str]] = {}
        for path in self._list(CASES_DIR):
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["case_id", "target", "status", "instances"], schema=CASES_SCHEMA)
            columns = (table.column(n).to_pylist() for n in table.column_names)
            for case_id, target, status, digest in zip(*columns, strict=True):
                pairs[(case_id, target)] = status
                if digest is not None:
                    series[(case_id, target)] = (path, digest)
        return pairs, series

    def config_hashes(self) -> set[str]:
        """Config hashes of the segmentation rows. Derived targets (`<target>@<kind>`, e.g. refined
        masks of `train/weak`) carry their own configuration and are left out."""
        table = self.cases(["target", "config_hash"])
        targets, hashes = table.column("target").to_pylist(), table.column("config_hash").to_pylist()
        return {h for t, h in zip(targets, hashes, strict=True) if h and "@" not in t}

    # -- maintenance -------------------------------------------------------------------------------
    def repair(self, *, live: str = "") -> list[str]:
        """Finish or undo what crashed runs left: publish every commit whose intent was written, then
        remove the staging of every run but `live` (the caller, who holds the writer lease), stale
        shared temporaries, and slices parts without their cases part (left by the protocol before
        intents). Returns what was published or removed."""
        done: list[str] = []
        for run in self._staged_runs():
            if run == live:
                continue
            for intent in self._intents(run):
                self._crash("during_repair")
                done.extend(f"published {posixpath.basename(dst)}" for dst in self._publish(intent))
            self.fs.rm(self.path(STAGING_DIR, run), recursive=True)
            done.append(f"removed staging/{run}")
        shared = self.path(STAGING_DIR, SHARED_TMP, "tmp")
        if self.local and os.path.isdir(shared):
            for name in os.listdir(shared):
                path = os.path.join(shared, name)
                if time.time() - os.path.getmtime(path) > STALE_TMP_S:
                    os.remove(path)
                    done.append(f"removed staging/{SHARED_TMP}/tmp/{name}")
        committed_names = {posixpath.basename(p).removeprefix("part-") for p in self._list(CASES_DIR)}
        for path in self._list(SLICES_DIR):
            if posixpath.basename(path).removeprefix("part-") not in committed_names:
                self.fs.rm(path)
                done.append(f"removed {posixpath.basename(path)}")
        if self.local:  # temporaries of the protocol before staging (they sat beside the files)
            for folder in (CASES_DIR, SLICES_DIR, MASKS_DIR):
                for parent, _, names in os.walk(self.path(folder)):
                    for name in names:
                        if name.startswith(".tmp-"):
                            os.remove(os.path.join(parent, name))
                            done.append(f"removed {name}")
        return done

    def end_staging(self, run: str) -> None:
        """A run's end: finish any publish an error cut short, then remove its staging folder. Never
        raises: whatever is left is finished or removed by the next run's repair."""
        try:
            for intent in self._intents(run):
                self._publish(intent)
            self.fs.rm(self.path(STAGING_DIR, run), recursive=True)
        except Exception:
            return

    def _staged_runs(self) -> list[str]:
        """Runs with a staging folder (scan's own folders, `scan-*`, and the shared tmp are not runs)."""
        try:
            entries = self.fs.ls(self.path(STAGING_DIR), detail=False)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e.rstrip("/")) for e in entries)
        return sorted(n for n in names if n and n != SHARED_TMP and not n.startswith("scan-"))

    def _intents(self, run: str) -> list[dict]:
        folder = self.path(STAGING_DIR, run, COMMITS)
        try:
            names = sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".intent.json"))
        except FileNotFoundError:
            return []
        return [json.loads(self.fs.cat_file(p)) | {"_path": p} for p in names]

    def drop_failed(self) -> list[tuple[str, str]]:
        """Delete the failed rows (whole failed-* files) so that their pairs are redone."""
        pairs = []
        for path in self._list(CASES_DIR):
            if posixpath.basename(path).startswith("failed-"):
                with self.fs.open(path, "rb") as f:
                    table = pq.read_table(f, columns=["case_id", "target"])
                pairs.extend(zip(table.column("case_id").to_pylist(), table.column("target").to_pylist(), strict=True))
                self.fs.rm(path)
        return pairs

    def take_retryable(self, max_attempts: int) -> dict[tuple[str, str], tuple[int, list[str]]]:
        """Remove the failed rows whose failure was transient (errors.TRANSIENT_CODES) and that have
        had fewer than `max_attempts` attempts, so that this run redoes their pairs without
        --retry-failed. Returns (case_id, target) -> (attempts so far, history), the history now
        ending with the removed row's outcome; the run's new rows carry both on (`stamp_attempts`).
        Each failed part is rewritten atomically without those rows (or removed when none is left)."""
        taken: dict[tuple[str, str], tuple[int, list[str]]] = {}
        columns = ["case_id", "target", "error_code", "error_message", "run_id", "attempts", "history"]
        for path in self._list(CASES_DIR):
            if not posixpath.basename(path).startswith("failed-"):
                continue
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f, schema=CASES_SCHEMA)
            rows = table.select(columns).to_pylist()
            retry = [r["error_code"] in TRANSIENT_CODES and (r["attempts"] or 1) < max_attempts for r in rows]
            if not any(retry):
                continue
            for row, again in zip(rows, retry, strict=True):
                if again:
                    n = row["attempts"] or 1  # rows of catalogs before version 3 count as one attempt
                    outcome = f"attempt {n} ({row['run_id']}): {row['error_code']}: {row['error_message']}"
                    taken[(row["case_id"], row["target"])] = (n, [*(row["history"] or []), outcome])
            kept = table.filter(pa.array([not again for again in retry]))
            if kept.num_rows:
                self.write_table(path, kept)
            else:
                self.fs.rm(path)
        return taken

    # -- committing --------------------------------------------------------------------------------
    def mask_paths(self, case_id: str, target: str) -> tuple[str, str]:
        """(NIfTI path, PNG path) of a mask; built from the case id and target name only."""
        base = self.path(MASKS_DIR, case_id, target)
        return base + ".nii.gz", base + ".png"

    def seg_path(self, case_id: str, target: str) -> str:
        """Path of a mask's DICOM SEG (beside its NIfTI); built from the case id and target name only."""
        return self.path(MASKS_DIR, case_id, target) + ".seg.dcm"

    def commit(
        self,
        run_id: str,
        seq: int,
        case_rows: Iterable[dict],
        slice_rows: Iterable[dict] | pa.Table,
        supersede: dict[tuple[str, str], str] | None = None,
    ) -> None:
        """Commit finished cases (protocol in the module docstring): parts staged, the intent written,
        then published into catalog/. `slice_rows` are dicts or a table with SLICES_SCHEMA. Failed rows
        go to their own file so that --retry-failed can drop them. `supersede`: pairs these rows
        replace -> the cases part holding their old row (a grown series redone); that part and its
        slices part are rewritten without them, published in the same intent (`_superseding`)."""
        if self.lease is not None:
            self.lease.check()
        case_rows = list(case_rows)
        if not isinstance(slice_rows, pa.Table):
            slice_rows = table_from_rows(list(slice_rows), SLICES_SCHEMA)
        ok = [r for r in case_rows if r["status"] != "failed"]
        failed = [r for r in case_rows if r["status"] == "failed"]
        name = f"{run_id}-{seq:06d}.parquet"
        staging = self.path(STAGING_DIR, run_id, COMMITS)
        parts: list[tuple[str, str, pa.Table]] = []  # (staged, published, rows), in publishing order
        if ok and slice_rows.num_rows:
            parts.append(("slices-part-" + name, self.path(SLICES_DIR, "part-" + name), slice_rows))
        if ok:
            cases = table_from_rows(ok, CASES_SCHEMA)
            parts.append(("cases-part-" + name, self.path(CASES_DIR, "part-" + name), cases))
        if failed:
            parts.append(
                ("cases-failed-" + name, self.path(CASES_DIR, "failed-" + name), table_from_rows(failed, CASES_SCHEMA))
            )
        if not parts:
            return
        if supersede:
            old_cases, old_slices = self._superseding(supersede)
            new_slices = 1 if ok and slice_rows.num_rows else 0
            parts = parts[:new_slices] + old_cases + parts[new_slices:] + old_slices
        for staged, _, table in parts:
            point = "slices_half_written" if staged.startswith("slices") else "cases_half_written"
            self.write_table(posixpath.join(staging, staged), table, crash_point=point)
        self._crash("before_intent")
        intent = {"run_id": run_id, "seq": seq, "files": [[posixpath.join(staging, a), b] for a, b, _ in parts]}
        intent_path = posixpath.join(staging, f"{seq:06d}.intent.json")
        self.write_bytes(intent_path, json.dumps(intent).encode())  # the commit point
        self._crash("after_intent")
        self._publish(intent | {"_path": intent_path})
        self.commits += 1

    def _superseding(self, supersede: dict[tuple[str, str], str]) -> tuple[list, list]:
        """Staged rewrites of the cases and slices parts that hold superseded pairs, without them:
        (cases rewrites, slices rewrites) as commit parts. Published in the order new slices, old
        cases rewritten, new cases, old slices rewritten: a reader may briefly see a pair's slice rows
        twice or its case row missing, never two case rows."""
        by_cases: dict[str, set[tuple[str, str]]] = {}
        by_slices: dict[str, set[tuple[str, str]]] = {}  # part-X holds the slices of part-X and failed-X
        for pair, path in supersede.items():
            by_cases.setdefault(path, set()).add(pair)
            base = posixpath.basename(path).removeprefix("failed-").removeprefix("part-")
            by_slices.setdefault(self.path(SLICES_DIR, "part-" + base), set()).add(pair)
        return self._rewrites(by_cases, CASES_SCHEMA, "cases"), self._rewrites(by_slices, SLICES_SCHEMA, "slices")

    def _rewrites(self, by_part: dict[str, set[tuple[str, str]]], schema: pa.Schema, kind: str) -> list:
        """(staged name, part, its rows without `pairs`) for each existing part of `by_part`."""
        out = []
        for path, pairs in sorted(by_part.items()):
            if not self.fs.exists(path):
                continue
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f, schema=schema)
            keys = zip(table.column("case_id").to_pylist(), table.column("target").to_pylist(), strict=True)
            keep = pa.array([key not in pairs for key in keys], pa.bool_())
            out.append((f"rewrite-{kind}-{posixpath.basename(path)}", path, table.filter(keep)))
        return out

    def _publish(self, intent: dict) -> list[str]:
        """Move an intent's staged parts into catalog/, in order, then delete the intent. Idempotent:
        a part already moved is skipped, so a publish cut short is finished by running it again."""
        published = []
        for n, (staged, final) in enumerate(intent["files"]):
            if n == 1:
                self._crash("between_publish")
            if not self.fs.exists(staged):
                continue  # moved by an earlier, interrupted publish
            if self.local:
                os.makedirs(posixpath.dirname(final), exist_ok=True)
                os.replace(staged, final)
            else:
                self.fs.copy(staged, final)  # server-side copy: the part appears whole
                self.fs.rm(staged)
            published.append(final)
        self.fs.rm(intent["_path"])
        return published

    def close_stale_runs(self, *, live: str) -> list[str]:
        """Mark the run records still saying "running" as failed, except `live`'s. Called under the
        writer lease, when no other run can be alive; returns the run ids marked."""
        try:
            paths = [p for p in self.fs.ls(self.path(RUNS_DIR), detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []
        paths = [p for p in paths if posixpath.basename(p) != f"{live}.json"]
        marked = []
        for path, data in sorted(self.fs.cat(paths).items() if paths else ()):  # fetched concurrently on S3
            try:
                document = json.loads(data)
            except ValueError:
                continue
            if document.get("status") == "running":
                document.update(status="failed", reason=f"its driver died before the end (found by run {live})")
                self.write_bytes(path, json.dumps(document, indent=2, default=str).encode())
                marked.append(str(document.get("run_id")))
        return marked

    def write_run(self, run_id: str, document: dict) -> str:
        path = self.path(RUNS_DIR, f"{run_id}.json")
        self.write_bytes(path, json.dumps(document, indent=2, default=str).encode())
        return to_uri(self.fs, path)
