"""A year of nightly runs through the catalog's real commit path: files, start-up reads and queries.

    .venv/bin/python bench/catalog_bench.py [--nights 365] [--commits 20] [--cases 50] [--slices-per-case 10]
    .venv/bin/python bench/catalog_bench.py --s3 --nights 12 --commits 5 --measure 1,6,12   # moto's S3 server

Each night is one run: `--commits` commits (Catalog.commit: the slice rows appended, the case rows
merged, as the job's writer flushes) of `--cases` new cases with `--slices-per-case` slice rows each,
the archive index merged for the night's objects (a new listing prefix per night, a header-sized
payload per object), and the upkeep a job does at its end (outputs/maintenance.maintain: compaction
of the tables holding 64 files or more, vacuum). The tables' retention (a week of nights) is scaled to
the bench's clock: a bench night lasts seconds, so "a week" is seven of them.

At the nights of `--measure` it prints, after the night's commits: the files under catalog/ and
index/ (data files and log entries) before and after compaction and vacuum; the grouper's start-up
read (Catalog.committed_state into CommittedPairs, in a fresh process); and the time and peak memory of
a GROUP BY and of a cases-slices join through `mcs-batch query` (each in a fresh process; peaks are
the processes' VmHWM: ru_maxrss of a child carries its parent's peak over fork and exec on Linux).

The issue's year is 365 nights x 200 commits of 50 cases; the default here is 10x fewer commits per
night (20), which this 2-core machine runs in about an hour: say so when quoting the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcs_batch.io.storage import StorageOptions, filesystem_for, join  # noqa: E402
from mcs_batch.outputs.catalog import TABLES, Catalog, CommitWindow  # noqa: E402
from mcs_batch.outputs.index import ArchiveIndex  # noqa: E402
from mcs_batch.outputs.maintenance import compact, file_counts, maintain, vacuum  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import local_s3  # noqa: E402

PAYLOAD = json.dumps({"header": {"rows": 512, "columns": 512, "position": [1.0, 2.0, 3.0], "note": "x" * 900}})
QUERIES = {
    "GROUP BY": "SELECT status, error_code, count(*) FROM cases GROUP BY 1, 2",
    "cases-slices join": "SELECT c.case_id, count(*) AS n FROM cases c JOIN slices s USING (case_id, target, run_id) "
                         "GROUP BY 1 ORDER BY n DESC LIMIT 5",
}  # fmt: skip
QUERY_CHILD = (
    "import json, sys, time; from mcs_batch.io.storage import StorageOptions; "
    "from mcs_batch.query import query_arrow; s = json.loads(sys.argv[3]); start = time.perf_counter(); "
    "query_arrow(sys.argv[1], sys.argv[2], storage=StorageOptions(**s) if s else None); "
    "print(json.dumps({'s': time.perf_counter() - start, "
    "'mb': int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024}))"
)  # fmt: skip
STARTUP_CHILD = (
    "import json, sys, time; from mcs_batch.io.storage import StorageOptions; "
    "from mcs_batch.outputs.catalog import Catalog, CommittedPairs; s = json.loads(sys.argv[2]); "
    "start = time.perf_counter(); pairs = CommittedPairs(Catalog(sys.argv[1], storage=StorageOptions(**s) if s else "
    "None).committed_state(), max_attempts=3); print(json.dumps({'s': time.perf_counter() - start, 'pairs': len(pairs),"
    " 'mb': int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024}))"
)  # fmt: skip


def case_id(night: int, commit: int, i: int) -> str:
    return hashlib.sha256(f"{night}/{commit}/{i}".encode()).hexdigest()[:24]


def night_start(night: int) -> str:
    """A night's start as run ids begin (run ids begin with their start time; the bench's nights get
    dates in the past of the bench's clock)."""
    return f"2026{1 + night // 28 % 12:02d}{1 + night % 28:02d}T{night // 336:02d}0000Z"


def one_night(catalog: Catalog, index: ArchiveIndex, night: int, args) -> float:
    run = f"{night_start(night)}-{night:06x}"
    start = time.perf_counter()
    objects = []
    for seq in range(args.commits):
        ids = [case_id(night, seq, i) for i in range(args.cases)]
        rows = [{"case_id": c, "target": "lungs", "status": "failed" if i % 25 == 0 else "ok", "run_id": run,
                 "error_code": "truncated" if i % 25 == 0 else None, "kind": "dicom_series", "modality": "CT",
                 "source_keys": [f"archive/night{night:04d}/{c}/{k}.dcm" for k in range(3)], "shape": [512, 512, 120],
                 "spacing_mm": [0.7, 0.7, 2.5], "affine": [1.0] * 16, "mask_voxels": i * 1000, "config_hash": "bench",
                 "warnings": [], "committed_at": f"night {night}"} for i, c in enumerate(ids)]  # fmt: skip
        ok = [c for c, r in zip(ids, rows, strict=True) if r["status"] == "ok"]
        slices = [{"case_id": c, "target": "lungs", "slice_index": k, "boxes_xyxy": [[1.0, 2.0, 30.0, 40.0]],
                   "sam_score": 0.9, "mask_pixels": 100, "run_id": run}
                  for c in ok for k in range(args.slices_per_case)]  # fmt: skip
        catalog.commit(run, seq, rows, slices)
        objects += [{"uri": f"s3://archive/night{night:04d}/{c}.dcm", "rel": f"archive/night{night:04d}/{c}.dcm",
                     "size": 500_000, "version": "v1", "payload": PAYLOAD, "case_id": c} for c in ids]  # fmt: skip
    index.append(f"night{night:04d}", objects, run_id=run)
    return time.perf_counter() - start


def window_probe(catalog: Catalog, night: int, cases: int = 2048) -> str:
    """One commit of `cases` new pairs merged against the whole table (as refinement commits) and one
    merged against its window (as a job's writer commits: the rows of runs started since the job, here
    the night's last run, started; the probes' run ids begin with the night's date, so later nights
    treat them as history): CPU and wall of each."""
    figures = []
    for k, windowed in enumerate((False, True)):
        run = f"{night_start(night)}-probe-{k}"
        ids = [hashlib.sha256(f"probe/{night}/{k}/{i}".encode()).hexdigest()[:24] for i in range(cases)]
        rows = [{"case_id": c, "target": "lungs", "status": "ok", "run_id": run, "kind": "dicom_series",
                 "shape": [512, 512, 120], "config_hash": "bench", "warnings": []} for c in ids]  # fmt: skip
        window = CommitWindow(since=night_start(night)) if windowed else None
        cpu, wall = time.process_time(), time.perf_counter()
        catalog.commit(run, 0, rows, [], window=window)
        figures.append(f"{'window' if windowed else 'whole table'} {time.process_time() - cpu:.3f} s CPU "
                       f"({time.perf_counter() - wall:.3f} s)")
    return f"a commit of {cases} cases: " + " vs ".join(figures)


def count_files(uri: str, storage: StorageOptions | None) -> str:
    """All files under `uri`, with how many are log entries and checkpoints (under _delta_log)."""
    fs, path = filesystem_for(uri, storage)
    try:
        found = list(fs.find(path))
    except FileNotFoundError:
        found = []
    log = sum("/_delta_log/" in p for p in found)
    return f"{len(found)} ({len(found) - log} data, {log} log)"


def in_child(code: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def set_retention(catalog: Catalog, index: ArchiveIndex, seconds: float) -> None:
    """The tables' retention scaled to the bench's clock: time travel a week back, tombstones two weeks
    (outputs/delta.py TABLE_PROPERTIES)."""
    properties = {"delta.logRetentionDuration": f"interval {int(seconds)} seconds",
                  "delta.deletedFileRetentionDuration": f"interval {int(2 * seconds)} seconds"}  # fmt: skip
    for dt in [catalog.table(spec) for spec in TABLES] + [index.table()]:
        if dt is not None:
            dt.alter.set_table_properties(properties)


def measure(night: int, out: str, storage: StorageOptions | None, storage_json: str, index_uri: str,
            catalog: Catalog) -> None:  # fmt: skip
    files_before = {"catalog": count_files(join(out, "catalog"), storage), "index": count_files(index_uri, storage)}
    compact(catalog, index=index_uri)
    vacuum(catalog, index=index_uri, retention_hours=None, masks=False)
    files_after = {"catalog": count_files(join(out, "catalog"), storage), "index": count_files(index_uri, storage)}
    active = sum(file_counts(catalog, index=index_uri).values())
    writer_mb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    startup = in_child(STARTUP_CHILD, out, storage_json)
    queries = {name: in_child(QUERY_CHILD, out, sql, storage_json) for name, sql in QUERIES.items()}
    print(f"night {night}: {startup['pairs']} pairs; files catalog/ {files_before['catalog']} -> "
          f"{files_after['catalog']}, index/ {files_before['index']} -> {files_after['index']} (before -> after "
          f"compaction and vacuum; {active} data files in the current versions, the rest kept for a week of time "
          f"travel); grouper start-up read {startup['s']:.2f} s ({startup['mb']:.0f} MB peak); "
          + "; ".join(f"{n} {q['s']:.2f} s ({q['mb']:.0f} MB peak)" for n, q in queries.items())
          + f"; this committing process's peak {writer_mb:.0f} MB", flush=True)


def start_moto() -> tuple[subprocess.Popen, StorageOptions]:
    """moto's server (bench/local_s3.py) with the bench's bucket."""
    server, endpoint = local_s3.start_moto()
    storage = StorageOptions(endpoint_url=endpoint, key="bench", secret="bench")
    fs, _ = filesystem_for("s3://bench-catalog", storage)
    fs.mkdir("bench-catalog")
    return server, storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--commits", type=int, default=20, help="commits per night (the issue's year: 200)")
    parser.add_argument("--cases", type=int, default=50, help="new cases per commit")
    parser.add_argument("--slices-per-case", type=int, default=10)
    parser.add_argument("--measure", default="1,30,365", help="nights to measure after")
    parser.add_argument("--s3", action="store_true", help="on moto's S3 server (started here) instead of local disk")
    args = parser.parse_args()
    measured = {int(n) for n in args.measure.split(",")}
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.s3:
            server, storage = start_moto()
            out = "s3://bench-catalog/out"
            storage_json = json.dumps({"endpoint_url": storage.endpoint_url, "key": "bench", "secret": "bench"})
        else:
            storage, out, storage_json = None, str(Path(tmp) / "out"), "{}"
        index_uri = join(out, "index")
        catalog, index = Catalog(out, storage=storage), ArchiveIndex(index_uri, storage=storage)
        print(f"{args.nights} nights x {args.commits} commits x {args.cases} cases ({args.slices_per_case} slice "
              f"rows per ok case) on {'S3 (moto)' if args.s3 else 'local disk'}", flush=True)  # fmt: skip
        week = None
        total = 0.0
        for night in range(1, args.nights + 1):
            seconds = one_night(catalog, index, night, args)
            total += seconds
            if week is None:
                week = 7 * seconds  # a week of nights on the bench's clock
                set_retention(catalog, index, week)
            upkeep = time.perf_counter()
            if night in measured:  # the probe first: a job's commits meet the tables as the night left them
                print(f"  night {night}: {window_probe(catalog, night)}", flush=True)
                measure(night, out, storage, storage_json, index_uri, catalog)
            else:
                maintain(catalog, min_files=64, index=index_uri)
            if night in measured or night % 50 == 0:
                print(f"  night {night}: {args.commits} commits in {seconds:.1f} s ({seconds / args.commits:.2f} s "
                      f"per commit), upkeep {time.perf_counter() - upkeep:.1f} s; {total / 60:.1f} min so far",
                      flush=True)  # fmt: skip
    if server is not None:
        server.terminate()


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
