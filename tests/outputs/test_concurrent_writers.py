"""Several writers committing to one OUT at once (processes, as jobs and refinements are), local and S3.

Every writer commits the same 60 pairs, in its own order, 6 per commit (each commit with its slice
rows): however their commits interleave and conflict, each pair ends with exactly one row, whose slice
rows are those of the writer that won it, and nothing is lost. The rate of commits is printed.
"""

from __future__ import annotations

import multiprocessing
import random
import time

import pytest

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import SLICES, Catalog, CommitWindow

PAIRS = [f"case{i:03d}" for i in range(60)]
PER_COMMIT = 6
OLD = "20250101T000000Z-aaaaaa"  # a run long before the writers (run ids begin with their start time)


def writer(out: str, storage: dict | None, name: str, seed: int, window: CommitWindow | None = None) -> dict:
    catalog = Catalog(out, storage=StorageOptions(**storage) if storage else None, owner=name)
    order = list(PAIRS)
    random.Random(seed).shuffle(order)
    inserted = dropped = 0
    for seq, first in enumerate(range(0, len(order), PER_COMMIT)):
        cases = order[first : first + PER_COMMIT]
        rows = [{"case_id": c, "target": "t", "status": "ok", "run_id": name} for c in cases]
        slices = [{"case_id": c, "target": "t", "slice_index": k, "run_id": name} for c in cases for k in range(3)]
        result = catalog.commit(name, seq, rows, slices, window=window)
        inserted, dropped = inserted + result.inserted, dropped + result.dropped
    return {"name": name, "inserted": inserted, "dropped": dropped, "commits": len(order) // PER_COMMIT}


def run_writers(out: str, storage: dict | None, n: int, window: CommitWindow | None = None
                ) -> tuple[list[dict], float]:  # fmt: skip
    context = multiprocessing.get_context("spawn")  # delta-rs' runtime refuses forked processes
    start = time.perf_counter()
    with context.Pool(n) as pool:
        results = pool.starmap(writer, [(out, storage, f"w{i}", i, window) for i in range(n)])
    return results, time.perf_counter() - start


def check_exactly_once(out: str, storage: StorageOptions | None, results: list[dict], older: int = 0) -> None:
    """older: rows of run OLD committed before the writers (other pairs), left as they were."""
    catalog = Catalog(out, storage=storage)
    rows = catalog.cases(["case_id", "run_id"]).to_pylist()
    assert sum(r["run_id"] == OLD for r in rows) == older
    rows = [r for r in rows if r["run_id"] != OLD]
    assert sorted(r["case_id"] for r in rows) == PAIRS  # each pair once, none lost
    assert sum(r["inserted"] for r in results) == len(PAIRS)  # each inserted by exactly one writer
    assert sum(r["inserted"] + r["dropped"] for r in results) == len(PAIRS) * len(results)
    winner = {r["case_id"]: r["run_id"] for r in rows}
    shown = catalog.slices(["case_id", "slice_index", "run_id"]).to_pylist()
    assert sorted((s["case_id"], s["slice_index"]) for s in shown) == [(c, k) for c in PAIRS for k in range(3)]
    assert all(s["run_id"] == winner[s["case_id"]] for s in shown)  # the slice rows of the row's own run
    assert catalog.read(SLICES).num_rows == len(PAIRS) * 3 * len(results)  # the losers' wait for compaction


@pytest.mark.parametrize("n", [2, 4])
def test_writers_on_local_disk_commit_each_pair_once(tmp_path, n):
    out = str(tmp_path / "out")
    results, seconds = run_writers(out, None, n)
    commits = sum(r["commits"] for r in results)
    print(f"\n{n} writers, local: {commits} commits in {seconds:.1f} s ({commits / seconds:.1f} commits/s)")
    check_exactly_once(out, None, results)


def test_writers_whose_merges_read_a_window_commit_each_pair_once(tmp_path):
    """As jobs' writers commit (outputs/catalog.py, "What a merge reads"): each merge reads only the rows
    of runs started since the jobs did, over a table that already holds older rows of other pairs."""
    out = str(tmp_path / "out")
    Catalog(out).commit(OLD, 0, [{"case_id": f"old{i:03d}", "target": "t", "status": "ok", "run_id": OLD}
                                 for i in range(100)], [])  # fmt: skip
    results, _ = run_writers(out, None, 3, window=CommitWindow.from_start(time.time(), []))
    check_exactly_once(out, None, results, older=100)


@pytest.mark.parametrize("n", [2, 4])
def test_writers_on_s3_commit_each_pair_once(s3_bucket, s3_server, n):
    bucket, _ = s3_bucket
    out = f"s3://{bucket}/out"
    args = {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}
    results, seconds = run_writers(out, args, n)
    commits = sum(r["commits"] for r in results)
    print(f"\n{n} writers, S3: {commits} commits in {seconds:.1f} s ({commits / seconds:.1f} commits/s)")
    check_exactly_once(out, StorageOptions(**args), results)
