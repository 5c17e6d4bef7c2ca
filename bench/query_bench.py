"""`mcs-batch query` on a cohort-sized catalog: DuckDB over the parts vs the SQLite copy it replaced.

    .venv/bin/python bench/query_bench.py [--cases 20000] [--slices-per-case 10] [--baseline-commit ed5343c]

Writes a synthetic catalog (committed through `Catalog.commit`, parts of 256 cases like the job's),
then times the same queries with this tree's `query` and with the baseline commit's `query.py`
(loaded from git into this process), and the peak memory each adds (tracemalloc sees Python and
Arrow allocations made through Python; DuckDB's own buffers are counted by its `memory_limit`).
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
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
    "slices per case": "SELECT c.case_id, count(*) FROM cases c JOIN slices s USING (case_id) GROUP BY 1 LIMIT 5",
}


def build(out: str, cases: int, per_case: int) -> None:
    catalog = Catalog(out)
    for seq, first in enumerate(range(0, cases, 256)):
        ids = [f"{i:024x}" for i in range(first, min(cases, first + 256))]
        rows = [{"case_id": c, "target": "lungs", "status": "ok" if i % 50 else "failed",
                 "error_code": None if i % 50 else "truncated", "source_keys": [f"site/{c}.dcm"],
                 "shape": [512, 512, per_case], "affine": [1.0] * 16, "mask_voxels": i}
                for i, c in enumerate(ids)]  # fmt: skip
        slices = [{"case_id": c, "target": "lungs", "slice_index": k, "boxes_xyxy": [[1.0, 2.0, 30.0, 40.0]],
                   "sam_score": 0.9, "mask_pixels": 100} for c in ids for k in range(per_case)]  # fmt: skip
        catalog.commit("bench", seq, rows, slices)
    catalog.end_staging("bench")


def baseline_module(commit: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:mcs_batch/query.py"], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "query_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("query_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, *args) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--slices-per-case", type=int, default=10)
    parser.add_argument("--baseline-commit", default="ed5343c")
    args = parser.parse_args()
    from mcs_batch.query import query

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out")
        start = time.perf_counter()
        build(out, args.cases, args.slices_per_case)
        print(f"catalog: {args.cases} cases, {args.cases * args.slices_per_case} slices "
              f"(built in {time.perf_counter() - start:.1f} s)")  # fmt: skip
        old = baseline_module(args.baseline_commit)
        for name, sql in QUERIES.items():  # this tree first: the baseline's copy would inflate the peak RSS
            new_s, new_kb = timed(query, out, sql)
            old_s, old_kb = timed(old.query, out, sql)
            print(f"{name:16s} this tree {new_s:6.2f} s (+{new_kb / 1024:5.0f} MB peak)   baseline "
                  f"{old_s:6.2f} s (+{old_kb / 1024:5.0f} MB peak)   {old_s / new_s:5.1f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
