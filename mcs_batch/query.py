"""`query`: SQL over the catalog with DuckDB, reading the Delta tables' snapshots where they lie.

Tables: `cases`, `slices`, `evaluation`, `stored` (what a PACS answered to each SEG sent to it:
outputs.dicomweb_store; always its latest version), and `manifest` when a scan wrote one. Each is a view over an
Arrow dataset of exactly the files the table's current version names (or the version `--as-of` asks
for: a table version, a time, or a run id, whose record names the versions it produced), read through
pyarrow's own filesystem, so nothing is copied into memory first: DuckDB pushes projections and
filters down to the Parquet files, on local disk and object stores alike. `slices` shows only the
slice rows of committed pairs (joined to `cases` on case id, target and run); the raw table is
`slices_all`. List columns stay lists.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum

import pyarrow as pa

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, join, native_arrow_filesystem
from mcs_batch.outputs.catalog import CASES, EVALUATION, SLICES, Catalog
from mcs_batch.outputs.pacs_store import STORED
from mcs_batch.outputs.runs import read_run
from mcs_batch.outputs.schema import MANIFEST_SCHEMA

RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
COMMITTED_SLICES = """
    SELECT s.* FROM slices_all s
    SEMI JOIN cases c ON s.case_id = c.case_id AND s.target = c.target AND s.run_id = c.run_id
"""


class OutputFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"  # newline-delimited JSON: one object per line (NDJSON)
    PARQUET = "parquet"


def versions_as_of(catalog: Catalog, as_of: str | None) -> dict[str, int | str | None]:
    """table -> the version (or ISO time) to read for `--as-of`: a run id (the versions its record
    names; its end time for tables it did not write), a number (that version of the cases table, the
    other tables as of its commit time) or an ISO time (every table as it stood then)."""
    names = [spec.name for spec in (CASES, SLICES, EVALUATION)]
    if not as_of:
        return dict.fromkeys(names)
    if RUN_ID.match(as_of):
        record = read_run(catalog, as_of)
        if record is None or not record.tables:
            raise ConfigError(f"--as-of {as_of}: no record of that run in {catalog.out} names table versions")
        when = record.finished_at or record.started_at
        return {name: record.version_of(name) if record.version_of(name) is not None else when for name in names}
    if as_of.isdigit():
        dt = catalog.table(CASES, version=int(as_of))
        when = _commit_time(dt)
        return {name: int(as_of) if name == "cases" else when for name in names}
    return dict.fromkeys(names, as_of)


def _commit_time(dt) -> str:
    from datetime import UTC, datetime

    entry = dt.history(1)[0]
    return datetime.fromtimestamp(entry["timestamp"] / 1000, UTC).isoformat()


def _snapshot(catalog: Catalog, spec, version):
    """The table's dataset as of `version`, or an empty table (a table not written then, or never)."""
    try:
        dataset = catalog.dataset(spec, version=version)
    except ConfigError:
        if version is None:
            raise
        dataset = None  # the table did not exist yet at that time
    return dataset if dataset is not None else spec.arrow_schema().empty_table()


def connect(out: str, *, storage: StorageOptions | None = None, as_of: str | None = None):
    """A DuckDB connection with OUT's tables as views. ConfigError when OUT holds neither a catalog
    nor a scan manifest (a mistyped path answers with an error, not with 0 rows)."""
    import duckdb
    import pyarrow.dataset as pads

    catalog = Catalog(out, storage=storage)
    versions = versions_as_of(catalog, as_of)
    found = catalog.exists()
    con = duckdb.connect()
    con.register("cases", _snapshot(catalog, CASES, versions["cases"]))
    con.register("slices_all", _snapshot(catalog, SLICES, versions["slices"]))
    con.execute(f"CREATE VIEW slices AS {COMMITTED_SLICES}")
    con.register("evaluation", _snapshot(catalog, EVALUATION, versions["evaluation"]))
    con.register("stored", _snapshot(catalog, STORED, None))  # the PACS store's answers: always the latest
    manifest = catalog.path("manifest")
    if catalog.fs.exists(manifest):
        found = True
        fs, path = native_arrow_filesystem(join(out, "manifest"), storage)
        con.register("manifest", pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA))
    if not found:
        raise ConfigError(f"{out}: no catalog or scan manifest here (expected catalog/cases or manifest/)")
    return con


def query_arrow(out: str, sql: str, *, storage: StorageOptions | None = None, as_of: str | None = None) -> pa.Table:
    """Run one SQL statement over OUT's tables: the result as an Arrow table."""
    import duckdb

    con = connect(out, storage=storage, as_of=as_of)
    try:
        return con.sql(sql).to_arrow_table() if sql.strip() else pa.table({})
    except duckdb.Error as e:
        raise ConfigError(f"query: {str(e).splitlines()[0]}") from e
    finally:
        con.close()


def query(out: str, sql: str, *, storage: StorageOptions | None = None, as_of: str | None = None
          ) -> tuple[list[str], list[tuple]]:  # fmt: skip
    """Run one SQL statement over OUT's tables: (column names, rows)."""
    table = query_arrow(out, sql, storage=storage, as_of=as_of)
    return table.column_names, [tuple(r.values()) for r in table.to_pylist()]


def _text(value) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)


def format_table(names: list[str], rows: list[tuple], *, width: int = 0) -> str:
    """A plain-text table; `width` > 0 cuts cells to that many characters (0: never)."""
    cells = [[_text(v)[:width] if width else _text(v) for v in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def render(table: pa.Table, fmt: OutputFormat, *, width: int = 0) -> bytes:
    """The result in `fmt` (parquet: the bytes of a Parquet file)."""
    if fmt == OutputFormat.PARQUET:
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue().to_pybytes()
    rows = table.to_pylist()
    if fmt == OutputFormat.JSON:
        return "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    if fmt == OutputFormat.CSV:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_text(v) for v in r.values()] for r in rows)
        return buffer.getvalue().encode()
    return (format_table(table.column_names, [tuple(r.values()) for r in rows], width=width) + "\n").encode()
