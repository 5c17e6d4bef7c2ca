"""Commits to the Delta tables under a crash at each of their steps, read meanwhile as curators read them.

A child process commits 4 commits of 3 cases each (masks first, as the job does) and dies at a step of
its second commit: killed (os._exit, like SIGKILL) with its slices committed or its cases committed,
or, on the S3 test endpoint, with its slices (or cases) data written and the commit's log entry never
landing (the proxy drops the PUT); or it dies inside the end-of-run compaction or vacuum. Before the
next run, deltalake, Polars, DuckDB (over the snapshot's Arrow dataset) and `mcs-batch query` must
never show a pair twice nor a case row without its mask, and show the slice rows of committed pairs
only; after the next run, every case and slice exactly once and masks equal to an uninterrupted run's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import CASES, SLICES, Catalog
from mcs_batch.query import query
from tests.faulty_s3 import Faults, FaultyS3

CASE_IDS = [f"case{i:02d}" for i in range(12)]
CHILD = r"""
import json, sys
from mcs_batch.faults import TestingConfig, crash_hook
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs import maintenance
from mcs_batch.outputs.catalog import Catalog
out, run, point = sys.argv[1], sys.argv[2], sys.argv[3]
cases, storage = json.loads(sys.argv[4]), json.loads(sys.argv[5])
catalog = Catalog(out, owner=run, storage=StorageOptions(**storage) if storage else None)
catalog.crash_hook = crash_hook(TestingConfig(crash_point=point, crash_at_commit=2), lambda: catalog.commits)
for seq, first in enumerate(range(0, len(cases), 3)):
    rows, slices = [], []
    for case in cases[first : first + 3]:
        path, _ = catalog.mask_paths(case, "t")
        catalog.write_bytes(path, f"mask of {case}".encode() * 50)
        rows.append({"case_id": case, "target": "t", "status": "ok", "run_id": run,
                     "mask_uri": catalog.fs.unstrip_protocol(path)})
        slices += [{"case_id": case, "target": "t", "slice_index": k, "run_id": run} for k in range(2)]
    catalog.commit(run, seq, rows, slices)
maintenance.compact(catalog)
maintenance.vacuum(catalog, retention_hours=0)
"""


def run_child(out: str, run: str, point: str, cases: list[str], storage: dict | None = None) -> int:
    args = [sys.executable, "-c", CHILD, out, run, point, json.dumps(cases), json.dumps(storage or {})]
    return subprocess.run(args, timeout=300).returncode


def read_everywhere(out: str, storage: StorageOptions | None) -> dict[str, tuple[list, list]]:
    """What each reader sees: case ids of the cases rows, (case, slice) of the committed slice rows."""
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    catalog = Catalog(out, storage=storage)
    seen = {}
    if catalog.table(CASES) is None:
        return {"catalog": ([], [])}
    keys = ["case_id", "target", "run_id"]
    shown = catalog.slices(["case_id", "slice_index"]).to_pylist()
    seen["catalog"] = (catalog.cases(["case_id"]).column("case_id").to_pylist(),
                       [(r["case_id"], r["slice_index"]) for r in shown])  # fmt: skip
    options = _delta_options(out, storage)
    cases_uri, slices_uri = f"{out}/catalog/cases", f"{out}/catalog/slices"
    cases = DeltaTable(cases_uri, storage_options=options).to_pyarrow_table(columns=keys)
    slices = DeltaTable(slices_uri, storage_options=options).to_pyarrow_table(columns=[*keys, "slice_index"])
    committed = slices.join(cases, keys=keys, join_type="left semi")  # how the README joins them
    seen["deltalake"] = (cases.column("case_id").to_pylist(),
                         list(zip(committed.column("case_id").to_pylist(), committed.column("slice_index").to_pylist(),
                                  strict=True)))  # fmt: skip
    pl_cases = pl.read_delta(cases_uri, storage_options=options or None)
    pl_slices = pl.read_delta(slices_uri, storage_options=options or None)
    pl_slices = pl_slices.join(pl_cases.select(keys), on=keys, how="semi")
    pairs = zip(pl_slices["case_id"].to_list(), pl_slices["slice_index"].to_list(), strict=True)
    seen["polars"] = (pl_cases["case_id"].to_list(), list(pairs))
    con = duckdb.connect()
    con.register("cases", catalog.dataset(CASES))
    con.register("slices_all", catalog.dataset(SLICES))
    seen["duckdb"] = ([c for (c,) in con.sql("SELECT case_id FROM cases").fetchall()],
                      con.sql("SELECT s.case_id, s.slice_index FROM slices_all s SEMI JOIN cases c "
                              "USING (case_id, target, run_id)").fetchall())  # fmt: skip
    seen["query"] = ([c for (c,) in query(out, "SELECT case_id FROM cases", storage=storage)[1]],
                     [tuple(r) for r in query(out, "SELECT case_id, slice_index FROM slices", storage=storage)[1]])
    return seen


def _delta_options(out: str, storage: StorageOptions | None) -> dict:
    from mcs_batch.outputs.delta import delta_options

    return delta_options(out, storage)


def masks_of(out: str, storage: StorageOptions | None) -> dict[str, bytes]:
    catalog = Catalog(out, storage=storage)
    return {c: catalog.fs.cat_file(catalog.mask_paths(c, "t")[0]) for c in CASE_IDS
            if catalog.fs.exists(catalog.mask_paths(c, "t")[0])}  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    out = str(tmp_path_factory.mktemp("reference"))
    assert run_child(out, "ref", "", CASE_IDS) == 0
    return masks_of(out, None)


def check_readers(out: str, storage, committed_at_most: list[str]) -> None:
    catalog = Catalog(out, storage=storage)
    for reader, (cases, slices) in read_everywhere(out, storage).items():
        assert len(cases) == len(set(cases)), reader  # never a pair twice
        assert set(cases) <= set(committed_at_most), (reader, cases)
        assert len(slices) == len(set(slices)), reader
        assert {c for c, _ in slices} == set(cases), reader  # a case row's slice rows, and no other
        for case in cases:  # never a case row without its mask
            assert catalog.fs.cat_file(catalog.mask_paths(case, "t")[0]) == f"mask of {case}".encode() * 50, reader


def finish_and_compare(out: str, storage, reference: dict[str, bytes], storage_args: dict | None = None) -> None:
    committed = {c for c, _ in Catalog(out, storage=storage).committed()}
    assert run_child(out, "r2", "", [c for c in CASE_IDS if c not in committed], storage_args) == 0
    for reader, (cases, slices) in read_everywhere(out, storage).items():
        assert sorted(cases) == CASE_IDS, reader
        assert sorted(slices) == sorted((c, k) for c in CASE_IDS for k in range(2)), reader
    assert masks_of(out, storage) == reference


@pytest.mark.parametrize(
    "point, committed",
    [
        ("slices_committed", 3),  # the second commit's slices are in the table, its cases are not: 1 commit stands
        ("cases_committed", 6),  # the cases merge is the commit point
        ("during_compaction", 12),
        ("during_vacuum", 12),
    ],
)
def test_a_crash_at_each_step_is_invisible_to_readers_and_the_next_run_completes(tmp_path, reference, point,
                                                                                 committed):  # fmt: skip
    out = str(tmp_path / "out")
    assert run_child(out, "r1", point, CASE_IDS) == 137
    check_readers(out, None, CASE_IDS[:committed])
    assert {c for c, _ in Catalog(out).committed()} == set(CASE_IDS[:committed])
    finish_and_compare(out, None, reference)


@pytest.mark.parametrize("table", ["slices", "cases"])
def test_data_written_whose_commit_never_lands_is_invisible_on_s3(tmp_path, reference, s3_bucket, s3_server, table):
    """Written, not committed: the second commit's data files reach the store, its log entry never does."""
    bucket, fs = s3_bucket
    out = f"s3://{bucket}/out"
    proxy = FaultyS3(s3_server["endpoint_url"], Faults(fail_puts_under=(f"{bucket}/out/catalog/{table}/_delta_log/",),
                                                       puts_allowed=1))  # fmt: skip
    try:
        args = {"endpoint_url": proxy.endpoint_url, "key": s3_server["key"], "secret": s3_server["secret"]}
        assert run_child(out, "r1", "", CASE_IDS, args) != 0  # the commit failed: the driver stopped
        assert proxy.counts().get("drop", 0) > 0
        proxy.heal()
        storage = StorageOptions(**args)
        written = fs.find(f"{bucket}/out/catalog/{table}")
        assert sum(p.endswith(".parquet") and "_delta_log" not in p for p in written) >= 2  # data past the log
        check_readers(out, storage, CASE_IDS[:3])
        assert {c for c, _ in Catalog(out, storage=storage).committed()} == set(CASE_IDS[:3])
        finish_and_compare(out, storage, reference, args)
    finally:
        proxy.stop()
