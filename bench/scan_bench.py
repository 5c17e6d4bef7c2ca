"""Scan throughput: files/s and bytes read per file, local and over a real S3 endpoint (moto).

Baseline, same process, same inputs: a sequential loop that reads every file whole with pydicom
(what a script without ranged header reads does). Prints both and the ratio.

    .venv/bin/python bench/scan_bench.py --series 100 --slices 30
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcs_batch.cluster import start_ray
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.scan import scan
from mcs_batch.testdata.series import write_series


def build_archive(root: Path, n_series: int, n_slices: int, size: int) -> int:
    for s in range(n_series):
        write_series(root / f"patient{s:04d}", rows=size, cols=size, n_slices=n_slices, series_seed=f"bench{s}")
    return sum(1 for p in root.rglob("*") if p.is_file())


def baseline(uris: list[str], storage: StorageOptions | None) -> tuple[float, int]:
    """Sequential whole-file reads + grouping by series: seconds, bytes read."""
    fs, _ = filesystem_for(uris[0], storage)
    start, nbytes, series = time.perf_counter(), 0, {}
    for uri in uris:
        with fs.open(fs._strip_protocol(uri), "rb") as f:
            data = f.read()
        nbytes += len(data)
        ds = pydicom.dcmread(io.BytesIO(data))
        series.setdefault(ds.SeriesInstanceUID, []).append(float(ds.ImagePositionPatient[2]))
    for positions in series.values():
        positions.sort()
    return time.perf_counter() - start, nbytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"S3 endpoint on port {port} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--size", type=int, default=64, help="rows = columns of each slice")
    ap.add_argument("--skip-s3", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        n = build_archive(root, args.series, args.slices, args.size)
        total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"archive: {n} DICOM files, {args.series} series, {total / n / 1024:.1f} KiB per file")
        start_ray(None, num_cpus=2, object_store_mb=512)
        results = {}

        def run(label: str, archive: str, out: str, storage: StorageOptions | None) -> None:
            scan([archive], out, storage=storage, progress=lambda m: None)  # warm-up: Ray workers, imports
            t0 = time.perf_counter()
            summary = scan([archive], out, storage=storage, progress=lambda m: None)
            seconds = time.perf_counter() - t0
            fs, path = filesystem_for(archive, storage)
            uris = sorted(fs.unstrip_protocol(p) for p in fs.find(path))
            base_s, base_bytes = baseline(uris, storage)
            results[label] = (n / seconds, summary.bytes_read / n, n / base_s, base_bytes / n)
            print(
                f"{label:5s} scan: {n / seconds:7.1f} files/s, {summary.bytes_read / n / 1024:6.1f} KiB read/file | "
                f"baseline (sequential whole-file pydicom): {n / base_s:7.1f} files/s, "
                f"{base_bytes / n / 1024:6.1f} KiB read/file | ratio {base_s / seconds:.2f}x time, "
                f"{base_bytes / max(summary.bytes_read, 1):.1f}x fewer bytes"
            )

        run("local", str(root), str(Path(tmp) / "out"), None)
        if not args.skip_s3:
            import s3fs

            port = free_port()
            # moto in its own process (not a thread of this one): the driver and baseline don't share its GIL
            server = subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for_port(port)
            try:
                storage = StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", key="bench", secret="bench")
                endpoint = {"endpoint_url": storage.endpoint_url}
                fs = s3fs.S3FileSystem(key="bench", secret="bench", client_kwargs=endpoint)
                fs.mkdir("bench-archive")
                fs.put(str(root) + "/", "bench-archive/archive/", recursive=True)
                run("s3", "s3://bench-archive/archive", "s3://bench-archive/out", storage)
            finally:
                server.terminate()
                server.wait()


if __name__ == "__main__":
    main()
