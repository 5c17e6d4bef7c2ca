"""`mcs-batch query`: DuckDB over the Delta tables' snapshots, local and on the S3 endpoint, in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mcs_batch.cli import main
from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.query import query, query_arrow

LONG_REASON = "case7.dcm:" + " the pixel data ends 3,141 bytes before its declared length" * 3


def fill(catalog: Catalog) -> None:
    rows = [{"case_id": f"c{i}", "target": "lungs", "status": "ok", "source_keys": [f"in/c{i}.png"], "mask_voxels": i}
            for i in range(5)]  # fmt: skip
    rows.append({"case_id": "c7", "target": "lungs", "status": "failed", "error_code": "truncated",
                 "error_message": LONG_REASON})  # fmt: skip
    for row in rows:
        row["run_id"] = "run1"
    slices = [{"case_id": f"c{i}", "target": "lungs", "slice_index": k, "run_id": "run1"} for i in range(5)
              for k in range(3)]  # fmt: skip
    catalog.commit("run1", 0, rows[:3], slices[:9])
    catalog.commit("run1", 1, rows[3:], slices[9:])


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> tuple[str, StorageOptions | None]:
    if request.param == "local":
        uri, storage = str(tmp_path / "out"), None
    else:
        bucket, _ = request.getfixturevalue("s3_bucket")
        uri, storage = f"s3://{bucket}/out", StorageOptions(**request.getfixturevalue("s3_server"))
    fill(Catalog(uri, storage=storage))
    return uri, storage


def test_sql_over_the_committed_snapshots(out):
    uri, storage = out
    names, rows = query(uri, "SELECT status, count(*) AS n FROM cases GROUP BY 1 ORDER BY 1", storage=storage)
    assert names == ["status", "n"] and rows == [("failed", 1), ("ok", 5)]
    joined = query_arrow(uri, "SELECT c.case_id, count(*) AS n FROM cases c JOIN slices s USING (case_id) "
                              "GROUP BY 1 ORDER BY 1", storage=storage)  # fmt: skip
    assert joined.to_pylist() == [{"case_id": f"c{i}", "n": 3} for i in range(5)]
    keys = query_arrow(uri, "SELECT source_keys FROM cases WHERE case_id = 'c2'", storage=storage)
    assert keys.column("source_keys").to_pylist() == [["in/c2.png"]]  # lists stay lists
    assert query(uri, "SELECT count(*) FROM evaluation", storage=storage)[1] == [(0,)]


def test_a_mistyped_out_or_bad_sql_is_one_clear_error(tmp_path: Path, out):
    uri, storage = out
    with pytest.raises(ConfigError, match="no catalog or scan manifest here"):
        query(str(tmp_path / "not-an-out"), "SELECT 1")
    with pytest.raises(ConfigError, match=r"^query: .*nosuchcolumn"):
        query(uri, "SELECT nosuchcolumn FROM cases", storage=storage)


def test_the_command_writes_every_format_without_cutting_cells(tmp_path: Path, capsys):
    uri = str(tmp_path / "out")
    fill(Catalog(uri))
    sql = "SELECT case_id, error_message FROM cases WHERE status = 'failed'"
    assert main(["query", uri, sql]) == 0
    assert LONG_REASON in capsys.readouterr().out  # the whole reason, not 60 characters of it
    assert main(["query", uri, sql, "--format", "json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"case_id": "c7", "error_message": LONG_REASON}
    ]
    assert main(["query", uri, "SELECT case_id, source_keys FROM cases ORDER BY 1 LIMIT 1", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["case_id,source_keys", 'c0,"[""in/c0.png""]"']
    target = tmp_path / "result.parquet"
    assert main(["query", uri, "SELECT * FROM slices", "--format", "parquet", "--output", str(target)]) == 0
    assert pq.read_table(target).num_rows == 15
    assert main(["query", uri, "SELECT * FROM slices", "--format", "parquet"]) == 2
    assert main(["query", str(tmp_path / "typo"), "SELECT 1"]) == 2
    assert "no catalog or scan manifest here" in capsys.readouterr().err


def readme_queries() -> list[str]:
    """The SQL lines of the README's curation-queries block."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("Curation queries", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("--")]


def test_the_readmes_curation_queries_run(tmp_path):
    queries = readme_queries()
    assert len(queries) == 6
    catalog = Catalog(str(tmp_path / "out"))
    fill(catalog)
    catalog.commit("run2", 0, [{"case_id": "c9", "target": "lungs", "status": "failed", "error_code": "unreadable",
                                "error_message": "storage", "attempts": 1, "retryable": True, "run_id": "run2"}],
                   [])  # fmt: skip
    results = [query(str(tmp_path / "out"), sql)[1] for sql in queries]
    assert sorted(results[0]) == [("lungs", "truncated", 1, LONG_REASON), ("lungs", "unreadable", 1, "storage")]
    assert [r[0] for r in results[5]] == ["c9"]  # the retryable failure
