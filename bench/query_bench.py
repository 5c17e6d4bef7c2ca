"""`mcs-batch query` on a cohort-sized catalog: the Delta tables as a night's commits left them, and
compacted.

    .venv/bin/python bench/query_bench.py [--cases 20000] [--slices-per-case 10] [--per-commit 50]

Writes a synthetic catalog through `Catalog.commit` (commits of `--per-commit` cases, as a busy job
makes them: one data file per table per commit), times two queries in a fresh process each (a
curation script's cost: start-up, the log read, the scan) with their peak memory, compacts the tables
(`mcs-batch catalog compact`) and times them again: the baseline is the same catalog before compaction.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcs_batch.outputs.catalog import Catalog  # noqa: E402

QUERIES = {
    "status counts": "SELECT status, error_code, count(*) FROM cases GROUP BY 1, 2",
    "cases-slices join": "SELECT c.case_id, count(*) FROM cases c JOIN slices s USING (case_id) GROUP BY 1 LIMIT 5",
}
CHILD = (
    "import json, sys, time; from mcs_batch.query import query_arrow; start = time.perf_counter(); "
    "query_arrow(sys.argv[1], sys.argv[2]); print(json.dumps({'s': time.perf_counter() - start, "
    "'mb': int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024}))"
)


def build(out: str, cases: int, per_case: int, per_commit: int) -> int:
    catalog = Catalog(out)
    commits = 0
    for seq, first in enumerate(range(0, cases, per_commit)):
        ids = [f"{i:024x}" for i in range(first, min(cases, first + per_commit))]
        rows = [{"case_id": c, "target": "lungs", "status": "ok" if i % 50 else "failed", "run_id": "bench",
                 "error_code": None if i % 50 else "truncated", "source_keys": [f"site/{c}.dcm"],
                 "shape": [512, 512, per_case], "affine": [1.0] * 16, "mask_voxels": i}
                for i, c in enumerate(ids)]  # fmt: skip
        slices = [{"case_id": c, "target": "lungs", "slice_index": k, "boxes_xyxy": [[1.0, 2.0, 30.0, 40.0]],
                   "sam_score": 0.9, "mask_pixels": 100, "run_id": "bench"}
                  for c in ids for k in range(per_case)]  # fmt: skip
        catalog.commit("bench", seq, rows, slices)
        commits += 1
    return commits


def timed_query(out: str, sql: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, out, sql], capture_output=True, text=True, cwd=ROOT,
                          check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--slices-per-case", type=int, default=10)
    parser.add_argument("--per-commit", type=int, default=50)
    args = parser.parse_args()
    from mcs_batch.outputs.maintenance import compact, file_counts

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out")
        start = time.perf_counter()
        commits = build(out, args.cases, args.slices_per_case, args.per_commit)
        seconds = time.perf_counter() - start
        print(f"catalog: {args.cases} cases, {args.cases * args.slices_per_case} slices in {commits} commits "
              f"({seconds:.1f} s, {commits / seconds:.1f} commits/s)")  # fmt: skip
        before = {name: timed_query(out, sql) for name, sql in QUERIES.items()}
        files = file_counts(Catalog(out))
        compact(Catalog(out))
        after = {name: timed_query(out, sql) for name, sql in QUERIES.items()}
        print(f"data files: {files} before compaction, {file_counts(Catalog(out))} after")
        for name in QUERIES:
            b, a = before[name], after[name]
            print(f"{name:18s} compacted {a['s']:6.2f} s ({a['mb']:5.0f} MB peak)   as committed {b['s']:6.2f} s "
                  f"({b['mb']:5.0f} MB peak)   {b['s'] / a['s']:4.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
