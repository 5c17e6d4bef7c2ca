"""`query`: SQL over the catalog with the standard library's SQLite (tables `cases`, `slices`,
`evaluation`, and `manifest` when a scan wrote one). List columns appear as JSON text."""

from __future__ import annotations

import json
import sqlite3

import pyarrow as pa

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog


def _sqlite_value(value):
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


def _load(con: sqlite3.Connection, name: str, table: pa.Table) -> None:
    columns = table.column_names
    con.execute(f"CREATE TABLE {name} ({', '.join(f'{c!r}' for c in columns)})")
    rows = ([_sqlite_value(v) for v in row.values()] for row in table.to_pylist())
    con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(columns))})", rows)


def query(out: str, sql: str, *, storage: StorageOptions | None = None) -> tuple[list[str], list[tuple]]:
    """Run one SQL statement over OUT's catalog: (column names, rows)."""
    catalog = Catalog(out, storage=storage)
    con = sqlite3.connect(":memory:")
    _load(con, "cases", catalog.cases())
    _load(con, "slices", catalog.slices())
    _load(con, "evaluation", catalog.evaluation())
    try:
        from mcs_batch.scan import read_manifest

        _load(con, "manifest", read_manifest(out, storage=storage))
    except (FileNotFoundError, OSError):
        pass
    try:
        cursor = con.execute(sql)
    except sqlite3.Error as e:
        raise ConfigError(f"query: {e}") from e
    names = [d[0] for d in cursor.description or ()]
    return names, cursor.fetchall()


def format_table(names: list[str], rows: list[tuple], *, width: int = 60) -> str:
    cells = [[str(v)[:width] for v in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
