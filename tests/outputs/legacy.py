"""An OUT in the layout of the release before Delta tables, for the migration's tests.

That release wrote each commit's rows as Parquet parts named after the run and commit
(catalog/cases/part-<run>-<seq>.parquet for ok and skipped rows, failed-<run>-<seq>.parquet for
failed ones, catalog/slices/part-<run>-<seq>.parquet), evaluation tables as
catalog/evaluation/<dataset>--<target>.parquet, the archive index as index/objects/<prefix_id>/part-
<run>-<seq>.parquet, commits being published as staged parts plus an intent under
staging/<run>/commits/, and its lease as locks/writer-<generation>.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mcs_batch.outputs.catalog import CASES, EVALUATION, SLICES, Catalog
from mcs_batch.outputs.index import INDEX_SCHEMA, ArchiveIndex


def write_part(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def to_legacy_layout(out: Path, *, index: Path | None = None) -> dict[str, int]:
    """Rewrite a Delta OUT (local) as the previous release laid it out; returns rows per table."""
    catalog = Catalog(str(out))
    cases, slices, evaluation = catalog.cases(), catalog.read(SLICES), catalog.evaluation()
    index_rows = _index_rows(index or out / "index")
    for spec in (CASES, SLICES, EVALUATION):
        shutil.rmtree(out / spec.folder, ignore_errors=True)
    for run in sorted(set(cases.column("run_id").to_pylist())):
        mine = cases.filter(pc.equal(cases.column("run_id"), run))
        ok = mine.filter(pc.not_equal(mine.column("status"), "failed"))
        failed = mine.filter(pc.equal(mine.column("status"), "failed"))
        if ok.num_rows:
            write_part(out / "catalog/cases" / f"part-{run}-000000.parquet", ok)
        if failed.num_rows:
            write_part(out / "catalog/cases" / f"failed-{run}-000000.parquet", failed)
    for run in sorted(set(slices.column("run_id").to_pylist())):
        write_part(out / "catalog/slices" / f"part-{run}-000000.parquet",
                   slices.filter(pc.equal(slices.column("run_id"), run)))  # fmt: skip
    for dataset, target in sorted({(r["dataset"], r["target"]) for r in evaluation.to_pylist()}):
        mask = pc.and_(pc.equal(evaluation.column("dataset"), dataset), pc.equal(evaluation.column("target"), target))
        write_part(out / "catalog/evaluation" / f"{dataset}--{target}.parquet", evaluation.filter(mask))
    if index_rows is not None:
        root = index or out / "index"
        shutil.rmtree(root)
        for prefix_id, rows in index_rows.items():
            table = pa.Table.from_pylist(rows, schema=pa.schema([f for f in INDEX_SCHEMA if f.name != "prefix_id"]))
            write_part(root / "objects" / prefix_id / f"part-{rows[0]['run_id']}-000000.parquet", table)
    for lock in (out / "locks").glob("run-*.json"):
        lock.unlink()
    (out / "locks").mkdir(exist_ok=True)
    (out / "locks" / "writer-00000003.json").write_text(json.dumps(
        {"run_id": "20261101T000000Z-old000", "host": "h", "pid": 1, "started_at": "2026-11-01T00:00:00+00:00",
         "heartbeat_at": "2026-11-01T01:00:00+00:00", "released": True}))  # fmt: skip
    return {"cases": cases.num_rows, "slices": slices.num_rows, "evaluation": evaluation.num_rows,
            "index": sum(len(r) for r in index_rows.values()) if index_rows else 0}  # fmt: skip


def _index_rows(root: Path) -> dict[str, list[dict]] | None:
    dt = ArchiveIndex(str(root)).table()
    if dt is None:
        return None
    out: dict[str, list[dict]] = {}
    for row in dt.to_pyarrow_table().to_pylist():
        out.setdefault(row.pop("prefix_id"), []).append(row)
    return out


def stage_unpublished_commit(out: Path, run: str, rows: list[dict]) -> None:
    """A crashed run's commit past its intent, not yet published (the previous release's repair
    published such commits at the next run's start)."""
    from mcs_batch.outputs.schema import CASES_SCHEMA, table_from_rows

    commits = out / "staging" / run / "commits"
    staged = commits / f"cases-part-{run}-000001.parquet"
    write_part(staged, table_from_rows(rows, CASES_SCHEMA))
    final = out / "catalog/cases" / f"part-{run}-000001.parquet"
    intent = {"run_id": run, "seq": 1, "files": [[str(staged), str(final)]]}
    (commits / "000001.intent.json").write_text(json.dumps(intent))
