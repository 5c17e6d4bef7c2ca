"""`query` and `report` exit 0 promptly, every time, over a catalog of many files (local and S3).

A DuckDB view over an Arrow dataset read through a Python-backed filesystem aborted at interpreter
exit ("terminate called without an active exception", exit 134) or hung after a query that stops
reading early (LIMIT) over a multi-file table: 4 runs in 5 on a 32-file catalog. The catalog's
datasets are read through pyarrow's own filesystems. Each run here is a fresh `mcs-batch` process, as a
curation script or a cron job runs it, with a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog

COMMITS = 32  # files per table: one per commit, never compacted here
RUNS_CI, RUNS_SLOW = 6, 100  # processes of each kind (the join a quarter of that); the old code failed 4 runs in 5
DEADLINE_S = 120  # a run past this hung


def fill(out: str, storage: StorageOptions | None) -> None:
    catalog = Catalog(out, storage=storage)
    for seq in range(COMMITS):
        rows = [{"case_id": f"c{seq:02d}{i}", "target": "lungs", "status": "ok" if i else "failed", "run_id": "r1",
                 "kind": "png", "source_uris": [f"s3://archive/{seq}/{i}.png"], "source_keys": [f"{seq}/{i}.png"],
                 "mask_voxels": i, "error_code": None if i else "truncated"} for i in range(3)]  # fmt: skip
        slices = [{"case_id": r["case_id"], "target": "lungs", "slice_index": k, "run_id": "r1"}
                  for r in rows for k in range(2)]  # fmt: skip
        catalog.commit("r1", seq, rows, slices)


def run_many(commands: list[list[str]], env: dict) -> list[tuple[int, str, bool]]:
    def one(command):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
            return done.returncode, done.stderr[-400:], False
        except subprocess.TimeoutExpired:
            return -1, "", True

    with ThreadPoolExecutor(2) as pool:  # the machine's two cores
        return list(pool.map(one, commands))


@pytest.mark.parametrize("runs", [RUNS_CI, pytest.param(RUNS_SLOW, marks=pytest.mark.slow)])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_limit_queries_aggregates_and_reports_exit_0_every_time(tmp_path: Path, where, runs, request):
    env = dict(os.environ)
    args: list[str] = []
    storage = None
    out = str(tmp_path / "out")
    if where == "s3":
        bucket, _ = request.getfixturevalue("s3_bucket")
        server = request.getfixturevalue("s3_server")
        storage = StorageOptions(**server)
        out = f"s3://{bucket}/out"
        args = ["--endpoint-url", server["endpoint_url"]]
        env.update(AWS_ACCESS_KEY_ID=server["key"], AWS_SECRET_ACCESS_KEY=server["secret"])
    fill(out, storage)
    mcs = [sys.executable, "-m", "mcs_batch.cli"]
    limit = [*mcs, "query", out, "SELECT case_id FROM cases LIMIT 2", *args]
    joined = [*mcs, "query", out, "SELECT s.case_id, count(*) FROM slices s JOIN cases USING (case_id) GROUP BY 1 "
              "LIMIT 3", *args]  # fmt: skip
    aggregate = [*mcs, "query", out, "SELECT status, count(*) FROM cases GROUP BY 1", *args]
    report = [*mcs, "report", out, "--sample", "2", *args]
    commands = [limit] * runs + [aggregate] * runs + [report] * runs + [joined] * (runs // 4)
    results = run_many(commands, env)
    hung = sum(h for _, _, h in results)
    failed = [(rc, err) for rc, err, h in results if rc != 0 and not h]
    assert (hung, failed) == (0, []), f"{hung} hung, {len(failed)} failed, e.g. {failed[:1]}"
