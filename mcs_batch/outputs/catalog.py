"""The output folder and its commit protocol, on local disk and on object storage alike.

    OUT/runs/<run_id>.json
    OUT/catalog/cases/part-<run_id>-<seq>.parquet     ok / skipped rows: a commit of those cases
    OUT/catalog/cases/failed-<run_id>-<seq>.parquet   failed rows (dropped and redone by --retry-failed)
    OUT/catalog/slices/part-<run_id>-<seq>.parquet    slice rows of the cases committed by the same seq
    OUT/masks/<case_id>/<target>.nii.gz (+ .png for 2D images)
    OUT/staging/<run_id>/               a running job's listing waves and slice parts (removed at its end)
    OUT/index/                          the archive index (mcs_batch.outputs.index)

A (case, target) is committed when its row is in a cases file. Every file is written atomically
(local: temporary name then rename; S3: one PUT), masks before the slices file before the cases file,
so a crash leaves at worst masks or a slices file without a commit, which `repair` removes and the
next run redoes. Committed pairs are skipped by later runs, so no pair ever has two rows.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, to_uri
from mcs_batch.outputs.schema import CASES_SCHEMA, SLICES_SCHEMA, table_from_rows

CASES_DIR, SLICES_DIR, MASKS_DIR, RUNS_DIR = "catalog/cases", "catalog/slices", "masks", "runs"
STAGING_DIR = "staging"  # per run: listing waves and slice parts awaiting assembly (never read as catalog)
EVALUATION_DIR = "catalog/evaluation"  # written by mcs_batch.eval.evaluate


class Catalog:
    """Reads and commits the outputs under OUT (a local folder or an object-store prefix)."""

    def __init__(self, out: str, *, storage: StorageOptions | None = None):
        if not out:
            raise ConfigError("outputs.uri (--out) is required")
        self.out = out
        self.fs, self.root = filesystem_for(out, storage)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = "file" in protocols

    # -- paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        return to_uri(self.fs, self.path(*parts))

    def _list(self, folder: str) -> list[str]:
        try:
            return sorted(p for p in self.fs.ls(self.path(folder), detail=False) if p.endswith(".parquet"))
        except FileNotFoundError:
            return []

    # -- atomic writes -----------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically: readers see the old object or the whole new one, never a part."""
        parent = posixpath.dirname(path)
        if self.local:
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # a single PUT is atomic on S3-compatible stores

    def _write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(path, sink.getvalue().to_pybytes())

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
        table = self.cases(["case_id", "target", "status"])
        return {(c, t): s for c, t, s in zip(*(table.column(n).to_pylist() for n in table.column_names), strict=True)}

    def config_hashes(self) -> set[str]:
        return {h for h in self.cases(["config_hash"]).column("config_hash").to_pylist() if h}

    # -- maintenance -------------------------------------------------------------------------------
    def repair(self) -> list[str]:
        """Remove what a crashed run left uncommitted: slices files without their cases file, and
        temporary files. Returns what was removed."""
        committed_names = {posixpath.basename(p).removeprefix("part-") for p in self._list(CASES_DIR)}
        removed = []
        for path in self._list(SLICES_DIR):
            if posixpath.basename(path).removeprefix("part-") not in committed_names:
                self.fs.rm(path)
                removed.append(path)
        try:  # staging of runs that are not running any more (one writer per OUT; see pipeline/job.py)
            for folder in self.fs.ls(self.path(STAGING_DIR), detail=False):
                self.fs.rm(folder, recursive=True)
                removed.append(folder)
        except FileNotFoundError:
            pass
        if self.local:
            for folder in (CASES_DIR, SLICES_DIR):
                directory = self.path(folder)
                if os.path.isdir(directory):
                    for name in os.listdir(directory):
                        if name.startswith(".tmp-"):
                            os.remove(os.path.join(directory, name))
                            removed.append(name)
        return removed

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

    # -- committing --------------------------------------------------------------------------------
    def mask_paths(self, case_id: str, target: str) -> tuple[str, str]:
        """(NIfTI path, PNG path) of a mask; built from the case id and target name only."""
        base = self.path(MASKS_DIR, case_id, target)
        return base + ".nii.gz", base + ".png"

    def commit(self, run_id: str, seq: int, case_rows: Iterable[dict], slice_rows: Iterable[dict] | pa.Table) -> None:
        """Commit finished cases: slice rows first (dicts, or a table with SLICES_SCHEMA), then the cases
        rows (the commit itself). Failed rows go to their own file so that --retry-failed can drop them."""
        case_rows = list(case_rows)
        if not isinstance(slice_rows, pa.Table):
            slice_rows = table_from_rows(list(slice_rows), SLICES_SCHEMA)
        ok = [r for r in case_rows if r["status"] != "failed"]
        failed = [r for r in case_rows if r["status"] == "failed"]
        name = f"{run_id}-{seq:06d}.parquet"
        if ok:
            if slice_rows.num_rows:
                self._write_table(self.path(SLICES_DIR, "part-" + name), slice_rows)
            self._write_table(self.path(CASES_DIR, "part-" + name), table_from_rows(ok, CASES_SCHEMA))
        if failed:
            self._write_table(self.path(CASES_DIR, "failed-" + name), table_from_rows(failed, CASES_SCHEMA))

    def write_run(self, run_id: str, document: dict) -> str:
        path = self.path(RUNS_DIR, f"{run_id}.json")
        self.write_bytes(path, json.dumps(document, indent=2, default=str).encode())
        return to_uri(self.fs, path)
