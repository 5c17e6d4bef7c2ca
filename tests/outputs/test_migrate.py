"""`mcs-batch catalog migrate OUT`: a catalog of the previous layout converted in place, nothing lost,
idempotent; until then, writers stop in one line naming the command."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mcs_batch.cli import main
from mcs_batch.errors import ConfigError
from mcs_batch.outputs.catalog import SLICES, Catalog
from mcs_batch.outputs.index import ArchiveIndex
from mcs_batch.outputs.migrate import migrate
from mcs_batch.outputs.schema import EVALUATION_SCHEMA, table_from_rows
from mcs_batch.query import query
from tests.outputs.legacy import stage_unpublished_commit, to_legacy_layout


def legacy_out(out: Path) -> dict[str, int]:
    """A catalog of three runs (ok, failed and skipped rows, slices, an evaluation, an index), in the
    previous layout, with a part of an older schema (no seg_uri, attempts...) and an unpublished commit."""
    catalog = Catalog(str(out))
    for n, run in enumerate(("20261101T000000Z-aaaaaa", "20261102T000000Z-bbbbbb", "20261103T000000Z-cccccc")):
        rows = [{"case_id": f"c{n}{i}", "target": "lungs", "status": "ok" if i else "failed", "run_id": run,
                 "error_code": None if i else "truncated", "config_hash": "h1", "committed_at": f"2026-11-0{n + 1}"}
                for i in range(4)]  # fmt: skip
        slices = [{"case_id": r["case_id"], "target": "lungs", "slice_index": k, "run_id": run}
                  for r in rows if r["status"] == "ok" for k in range(2)]  # fmt: skip
        catalog.commit(run, 0, rows, slices)
    catalog.replace_evaluation("set", "lungs", table_from_rows([{"dataset": "set", "target": "lungs", "truth_key": "k",
                                                                 "status": "ok", "dice": 0.5}], EVALUATION_SCHEMA))
    objects = [{"uri": "file:///a/x.dcm", "rel": "a/x.dcm", "size": 3, "version": "1", "payload": "{}",
                "case_id": "c01"}]
    ArchiveIndex(str(out / "index")).append("p1", objects, run_id="r")
    counts = to_legacy_layout(out)
    old = out / "catalog/cases" / "part-20261101T000000Z-aaaaaa-000000.parquet"  # written by an older release
    table = pq.read_table(old)
    pq.write_table(table.drop_columns(["seg_uri", "attempts", "retryable", "history", "instances"]), old)
    stage_unpublished_commit(out, "20261104T000000Z-dddddd", [{"case_id": "late", "target": "lungs", "status": "ok",
                                                              "run_id": "20261104T000000Z-dddddd"}])  # fmt: skip
    return counts


def test_a_catalog_of_the_previous_layout_converts_in_place_losing_nothing(tmp_path: Path, capsys):
    out = tmp_path / "out"
    counts = legacy_out(out)
    with pytest.raises(ConfigError, match=r"layout before Delta tables; convert it with `mcs-batch catalog migrate"):
        Catalog(str(out)).check_writable()  # a job stops here, before writing anything
    lease = out / "locks" / "writer-00000003.json"
    live = json.loads(lease.read_text()) | {"released": False, "host": "elsewhere",
                                            "heartbeat_at": "2999-01-01T00:00:00+00:00"}  # fmt: skip
    lease.write_text(json.dumps(live))
    with pytest.raises(ConfigError, match="of the previous release is writing it"):
        migrate(str(out))
    lease.write_text(json.dumps(live | {"released": True}))

    assert main(["catalog", "migrate", str(out)]) == 0
    assert "converted to Delta tables: cases 13 row(s), slices 18 row(s), evaluation 1 row(s), index 1 row(s)" in (
        capsys.readouterr().out)
    catalog = Catalog(str(out))
    cases = {r["case_id"]: r for r in catalog.cases().to_pylist()}
    assert len(cases) == counts["cases"] + 1 and "late" in cases  # every row, and the crashed run's commit
    assert cases["c01"]["attempts"] is None and cases["c11"]["seg_uri"] is None  # older columns read as null
    assert catalog.read(SLICES).num_rows == counts["slices"] and catalog.evaluation().num_rows == 1
    assert ArchiveIndex(str(out / "index")).read_prefix("p1")["file:///a/x.dcm"]["case_id"] == "c01"
    assert not list(out.glob("catalog/*/*-2026110*.parquet")) and not (out / "index" / "objects").exists()
    assert not list((out / "locks").glob("writer-*"))
    assert query(str(out), "SELECT status, count(*) FROM cases GROUP BY 1 ORDER BY 1")[1] == [("failed", 3),
                                                                                               ("ok", 10)]  # fmt: skip
    catalog.check_writable()

    assert migrate(str(out)).lines() == [f"{out}: already in Delta tables, nothing to migrate"]  # idempotent
    assert Catalog(str(out)).cases().num_rows == counts["cases"] + 1


def test_a_migration_cut_short_after_the_commit_is_finished_by_running_it_again(tmp_path: Path):
    out = tmp_path / "out"
    legacy_out(out)
    old_parts = sorted((out / "catalog/cases").glob("*.parquet"))
    migrate(str(out))
    for part in old_parts:  # as if the migration died between the Delta commit and removing the old parts
        if not part.exists():
            pq.write_table(pa.table({"case_id": ["stray"]}), part)
    committed = Catalog(str(out)).committed()
    result = migrate(str(out))
    assert (result.removed, result.tables) == (len(old_parts), {})  # the left-over parts go, nothing converted twice
    assert Catalog(str(out)).committed() == committed and not list((out / "catalog/cases").glob("part-2026*"))
