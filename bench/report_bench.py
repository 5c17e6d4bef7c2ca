"""`mcs-batch report` on a cohort-sized catalog: time and peak memory of one report.

    .venv/bin/python bench/report_bench.py [--cases 100000] [--parts-of 256]

Writes a synthetic catalog (committed through `Catalog.commit`, commits of 256 cases like the job's):
every row is a distinct case with its own metrics (sizes, SAM scores, saliency, 2% failures over
five codes), and all of them point at a few real sources and masks (PNGs, a DICOM series, a NIfTI:
tests/report/cohort.py), so the thumbnails decode real images. Then times `write_report` and prints
the peak RSS it added and the report's size.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mcs_batch.outputs.catalog import Catalog  # noqa: E402
from tests.report.cohort import write_inputs, write_run  # noqa: E402

CODES = ["truncated", "decode_error", "unreadable", "too_large", "not_dicom"]


def build(folder: Path, cases: int, parts_of: int) -> str:
    templates = [r for k, r in write_run(write_inputs(folder), str(folder / "real")).items() if "@" not in k]
    out = str(folder / "out")
    catalog, rng = Catalog(out), np.random.default_rng(0)
    for seq, first in enumerate(range(0, cases, parts_of)):
        rows = []
        for i in range(first, min(cases, first + parts_of)):
            row = dict(templates[i % len(templates)], case_id=f"{i:024x}", run_id="run-a")
            if i % 50 == 0:
                row.update(status="failed", error_code=CODES[i % 5], error_message=f"case {i}: {CODES[i % 5]}",
                           mask_uri=None, mask_voxels=None, mask_volume_ml=None)  # fmt: skip
            else:
                scale = float(rng.lognormal(0, 0.5))
                voxels = 0 if i % 97 == 0 else max(1, int((row["mask_voxels"] or 50) * scale))
                ml = None if row["mask_volume_ml"] is None else row["mask_volume_ml"] * scale
                row.update(mask_voxels=voxels, mask_volume_ml=ml, sam_score_mean=float(rng.beta(8, 2)),
                           saliency_mean=float(rng.beta(2, 8)), saliency_max=float(rng.beta(8, 2)))  # fmt: skip
            rows.append(row)
        catalog.commit("bench", seq, rows, [])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--parts-of", type=int, default=256)
    args = parser.parse_args()
    from mcs_batch.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = build(Path(tmp), args.cases, args.parts_of)
        parts = len(list((Path(out) / "catalog" / "cases").glob("*.parquet")))
        print(f"catalog: {args.cases:,} cases in {parts} parts (built in {time.perf_counter() - start:.1f} s)")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        summary = write_report(out, sample=12, seed=0)
        seconds = time.perf_counter() - start
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        size = Path(summary.uri.removeprefix("file://")).stat().st_size / 2**20
        print(f"report: {seconds:.1f} s, peak RSS +{peak:.0f} MB, {summary.thumbnails} thumbnails of "
              f"{len(summary.shown)} pairs, {size:.1f} MB of HTML")  # fmt: skip


if __name__ == "__main__":
    main()
