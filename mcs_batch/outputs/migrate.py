"""`mcs-batch catalog migrate OUT`: a catalog of the layout before Delta tables, converted in place.

The previous layout kept each table as a folder of Parquet parts (catalog/cases/part-* and failed-*,
catalog/slices/part-*, catalog/evaluation/<dataset>--<target>.parquet), the archive index as parts per
prefix (index/objects/<prefix_id>/), commits being published as intents under staging/, and one
writer at a time through a lease (locks/writer-*.json). Migration:

  1. refuses while a job of the previous release holds the lease (its heartbeat is fresh);
  2. finishes the publishes that crashed runs left (their intents), as that release's repair did;
  3. writes each table's rows (read with the current schema: columns older parts lack are null) as a
     Delta table in the same folder, in one commit; then removes the old parts, only those (named as
     the previous release named them, and named by no commit of the log);
  4. the archive index likewise (newest row per object), partitioned by prefix;
  5. removes the old lease files (the old runs' staging goes with the next job's sweep: they have no
     heartbeat, outputs/lease.py).

Every step can be cut short and run again: a table already in the log is not written twice, and its
left-over old parts are removed then. Nothing is lost: row counts are checked before the old parts go.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, join, native_arrow_filesystem
from mcs_batch.outputs.catalog import STAGING_DIR, TABLES, Catalog, _new_table
from mcs_batch.outputs.delta import DELTA_FILE, TableSpec, delta_options, open_table, table_uri
from mcs_batch.outputs.index import INDEX, INDEX_SCHEMA
from mcs_batch.outputs.lease import LOCKS_DIR, alive

OLD_LEASE_TTL_S = 120.0


@dataclass
class Migration:
    out: str
    tables: dict[str, int] = field(default_factory=dict)  # table -> rows converted
    removed: int = 0  # old files removed
    published: int = 0  # parts of crashed runs' commits published first

    def lines(self) -> list[str]:
        if not self.tables and not self.removed and not self.published:
            return [f"{self.out}: already in Delta tables, nothing to migrate"]
        converted = ", ".join(f"{name} {rows} row(s)" for name, rows in self.tables.items()) or "no table"
        return [f"{self.out}: converted to Delta tables: {converted}",
                f"  {self.published} part(s) of interrupted commits published first; {self.removed} old file(s) "
                "removed"]  # fmt: skip


def migrate(out: str, *, storage: StorageOptions | None = None, index: str | None = None) -> Migration:
    """Convert OUT in place (module docstring). `index`: the archive index root when not OUT/index."""
    catalog = Catalog(out, storage=storage)
    result = Migration(out)
    _refuse_live_writer(catalog)
    result.published = _publish_intents(catalog)
    for spec in TABLES:
        rows, removed = _table(catalog, spec)
        if rows is not None:
            result.tables[spec.name] = rows
        result.removed += removed
    rows, removed = _index(index or join(out, "index"), storage)
    if rows is not None:
        result.tables["index"] = rows
    result.removed += removed + _old_locks(catalog)
    return result


def _refuse_live_writer(catalog: Catalog) -> None:
    for path in _ls(catalog, LOCKS_DIR):
        if posixpath.basename(path).startswith("writer-"):
            try:
                record = json.loads(catalog.fs.cat_file(path))
            except (FileNotFoundError, ValueError):
                continue
            if alive(record, OLD_LEASE_TTL_S):
                raise ConfigError(f"{catalog.out}: run {record.get('run_id')} of the previous release is writing it "
                                  "(its lease is alive): migrate once it has finished")  # fmt: skip


def _ls(catalog: Catalog, folder: str) -> list[str]:
    try:
        return sorted(catalog.fs.ls(catalog.path(folder), detail=False))
    except FileNotFoundError:
        return []


def _publish_intents(catalog: Catalog) -> int:
    """The previous release's repair: each intent's staged parts moved into the catalog, in order."""
    published = 0
    for run_folder in _ls(catalog, STAGING_DIR):
        commits = posixpath.join(STAGING_DIR, posixpath.basename(run_folder.rstrip("/")), "commits")
        for intent_path in (p for p in _ls(catalog, commits) if p.endswith(".intent.json")):
            intent = json.loads(catalog.fs.cat_file(intent_path))
            for staged, final in intent["files"]:
                if catalog.fs.exists(staged):
                    catalog.fs.copy(staged, final)  # the part appears whole (a server-side copy on S3)
                    catalog.fs.rm(staged)
                    published += 1
            catalog.fs.rm(intent_path)
    return published


def _old_parts(catalog: Catalog, spec: TableSpec, referenced: set[str]) -> list[str]:
    """Parquet files of the previous layout in a table's folder: not named by the log, not named as
    delta-rs names its files (a concurrent writer's file not yet committed is never touched)."""
    out = []
    for path in _ls(catalog, spec.folder):
        name = posixpath.basename(path)
        if name.startswith(".tmp-") or (name.endswith(".parquet") and name not in referenced
                                        and not DELTA_FILE.match(name)):  # fmt: skip
            out.append(path)
    return out


def _table(catalog: Catalog, spec: TableSpec) -> tuple[int | None, int]:
    """(rows converted, or None when nothing was to convert; old files removed)."""
    from deltalake import write_deltalake

    dt = open_table(catalog.out, spec, catalog.storage) if _has_log(catalog, spec) else None
    referenced = {posixpath.basename(u) for u in dt.file_uris()} if dt is not None else set()
    old = [p for p in _old_parts(catalog, spec, referenced) if p.endswith(".parquet")]
    rows = None
    if dt is None and old:
        table = _read_old(catalog, old, spec.schema)
        if spec.name == "cases":
            table = _one_row_per_pair(table)
        options = delta_options(catalog.out, catalog.storage)
        write_deltalake(table_uri(catalog.out, spec), table.cast(spec.arrow_schema()), mode="error",
                        storage_options=options, **_new_table(spec, None))  # fmt: skip
        dt = open_table(catalog.out, spec, catalog.storage)
        if dt.count() != table.num_rows:
            raise RuntimeError(f"{spec.name}: {dt.count()} rows in the new table, {table.num_rows} read: the old "
                               "parts are kept")  # fmt: skip
        rows = table.num_rows
    removed = 0
    for path in _old_parts(catalog, spec, {posixpath.basename(u) for u in dt.file_uris()} if dt else set()):
        if dt is not None:  # only once the table is in the log
            catalog.fs.rm(path)
            removed += 1
    return rows, removed


def _has_log(catalog: Catalog, spec: TableSpec) -> bool:
    return catalog.fs.exists(catalog.path(spec.folder, "_delta_log"))


def _read_old(catalog: Catalog, paths: list[str], schema: pa.Schema) -> pa.Table:
    """The rows of the old parts, in the current schema (columns a part lacks read as null)."""
    fs, _ = native_arrow_filesystem(catalog.out, catalog.storage)
    tables = []
    for path in paths:
        part = pq.read_table(path, filesystem=fs)
        columns = [part.column(f.name).cast(f.type) if f.name in part.column_names else pa.nulls(part.num_rows, f.type)
                   for f in schema]  # fmt: skip
        tables.append(pa.Table.from_arrays(columns, schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _one_row_per_pair(table: pa.Table) -> pa.Table:
    """The latest row of each (case, target): the previous protocol kept one, this makes sure of it."""
    keys = list(zip(table.column("case_id").to_pylist(), table.column("target").to_pylist(), strict=True))
    order = sorted(range(table.num_rows), key=lambda i: (table.column("committed_at")[i].as_py() or ""))
    last = {keys[i]: i for i in order}
    return table.take(sorted(last.values()))


def _index(root: str, storage: StorageOptions | None) -> tuple[int | None, int]:
    """The archive index: parts per prefix (newest row per URI) into the Delta table."""
    from deltalake import write_deltalake

    fs, path = filesystem_for(join(root, "objects"), storage)
    try:
        folders = sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        return None, 0
    rows = None
    if open_table(root, INDEX, storage) is None:
        latest: dict[str, dict] = {}
        for folder in folders:
            prefix_id = posixpath.basename(folder.rstrip("/"))
            for part in sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")
                               and not posixpath.basename(p).startswith(".tmp-")):  # fmt: skip
                with fs.open(part, "rb") as f:
                    for row in pq.read_table(f).to_pylist():
                        latest[row["uri"]] = {**{k: row.get(k) for k in INDEX_SCHEMA.names}, "prefix_id": prefix_id}
        table = pa.Table.from_pylist(list(latest.values()), schema=INDEX.arrow_schema())
        write_deltalake(table_uri(root, INDEX), table, mode="error", partition_by=["prefix_id"], name="index",
                        storage_options=delta_options(root, storage))  # fmt: skip
        rows = table.num_rows
    fs.rm(path, recursive=True)
    return rows, len(folders)


def _old_locks(catalog: Catalog) -> int:
    removed = 0
    for path in _ls(catalog, LOCKS_DIR):
        if posixpath.basename(path).startswith("writer-"):
            catalog.fs.rm(path)
            removed += 1
    return removed

