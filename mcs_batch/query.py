"""`query`: SQL over the catalog with DuckDB, reading the committed Parquet parts where they lie.

Tables: `cases`, `slices`, `evaluation`, and `manifest` when a scan wrote one. Each is a view over
an Arrow dataset of the files readers are meant to see (`Catalog` lists them: hidden names and
staging never), so nothing is copied into memory first: DuckDB pushes projections and filters down
to the Parquet files, on local disk and object stores alike (through the same fsspec filesystem the
job writes with). List columns stay lists.
"""

from __future__ import annotations

import json
from enum import StrEnum

import pyarrow as pa

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, arrow_filesystem, join
from mcs_batch.outputs.catalog import CASES_DIR, EVALUATION_DIR, SLICES_DIR, Catalog
from mcs_batch.outputs.schema import CASES_SCHEMA, EVALUATION_SCHEMA, MANIFEST_SCHEMA, SLICES_SCHEMA


class OutputFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"  # one JSON object per line
    PARQUET = "parquet"


def _dataset(catalog: Catalog, folder: str, schema: pa.Schema):
    import pyarrow.dataset as pads

    files = catalog._list(folder)
    if not files:
        return schema.empty_table()
    fs, _ = arrow_filesystem(catalog.out, catalog.storage)
    return pads.dataset(files, schema=schema, format="parquet", filesystem=fs)


def connect(out: str, *, storage: StorageOptions | None = None):
    """A DuckDB connection with OUT's tables as views. ConfigError when OUT holds neither a catalog
    nor a scan manifest (a mistyped path answers with an error, not with 0 rows)."""
    import duckdb
    import pyarrow.dataset as pads

    catalog = Catalog(out, storage=storage)
    con = duckdb.connect()
    found = False
    for name, folder, schema in (("cases", CASES_DIR, CASES_SCHEMA), ("slices", SLICES_DIR, SLICES_SCHEMA),
                                 ("evaluation", EVALUATION_DIR, EVALUATION_SCHEMA)):  # fmt: skip
        found = found or catalog.fs.exists(catalog.path(folder))
        con.register(name, _dataset(catalog, folder, schema))
    manifest = catalog.path("manifest")
    if catalog.fs.exists(manifest):
        found = True
        fs, path = arrow_filesystem(join(out, "manifest"), storage)
        con.register("manifest", pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA))
    if not found:
        raise ConfigError(f"{out}: no catalog or scan manifest here (expected catalog/cases or manifest/)")
    return con


def query_arrow(out: str, sql: str, *, storage: StorageOptions | None = None) -> pa.Table:
    """Run one SQL statement over OUT's tables: the result as an Arrow table."""
    import duckdb

    con = connect(out, storage=storage)
    try:
        return con.sql(sql).to_arrow_table() if sql.strip() else pa.table({})
    except duckdb.Error as e:
        raise ConfigError(f"query: {str(e).splitlines()[0]}") from e
    finally:
        con.close()


def query(out: str, sql: str, *, storage: StorageOptions | None = None) -> tuple[list[str], list[tuple]]:
    """Run one SQL statement over OUT's tables: (column names, rows)."""
    table = query_arrow(out, sql, storage=storage)
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
