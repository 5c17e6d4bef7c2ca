"""Folder copies between a node and S3: one request at a time vs `run.transfer_connections` in flight.

A real S3 endpoint (moto's server on 127.0.0.1, a process of its own), a folder of N small files
(the shape of nnU-Net's preprocessed 2d data: many small .b2nd / .pkl files), uploaded and downloaded
with `mcs_batch.train.weak.files` at connections=1 (what train-weak did before) and at the given counts.
Printed: seconds, files and MB per second, and the ratio to one connection. Loopback moto answers in
about a millisecond; a real store's tens of milliseconds per request make the gap wider, not narrower.

    PYTHONPATH=. .venv/bin/python bench/transfer_bench.py [--files 500] [--kib 16] [--connections 1 4 8 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from local_s3 import start_moto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--kib", type=int, default=16, help="size of each file")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per count")
    args = parser.parse_args()

    import s3fs

    from mcs_batch.io.storage import StorageOptions
    from mcs_batch.train.weak.files import download_folder, upload_folder

    server, endpoint = start_moto()
    try:
        storage = StorageOptions(endpoint_url=endpoint, key="testing", secret="testing")  # moto accepts any
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        root = Path(tempfile.mkdtemp(prefix="transfer-bench-"))
        rng = np.random.default_rng(0)
        for i in range(args.files):
            path = root / "src" / f"nnUNetPlans_2d/case_{i:04d}.b2nd"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.bytes(args.kib * 1024))
        megabytes = args.files * args.kib / 1024
        print(f"{args.files} files of {args.kib} KiB ({megabytes:.1f} MB), moto S3 on 127.0.0.1, best of "
              f"{args.repeats}")  # fmt: skip
        print(f"{'connections':>11} {'upload s':>9} {'files/s':>8} {'x':>6} {'download s':>11} {'files/s':>8} {'x':>6}")
        base = None
        for n in args.connections:
            up = down = float("inf")
            for r in range(args.repeats):
                uri = f"s3://bench/c{n}-{r}"
                up = min(up, upload_folder(root / "src", uri, storage, connections=n).seconds)
                report = download_folder(uri, root / f"dst-{n}-{r}", storage, connections=n)
                if report.transferred != args.files:
                    raise RuntimeError(f"downloaded {report.transferred} of {args.files} files")
                down = min(down, report.seconds)
            base = base or (up, down)
            print(f"{n:>11} {up:>9.2f} {args.files / up:>8.0f} {base[0] / up:>6.1f} {down:>11.2f} "
                  f"{args.files / down:>8.0f} {base[1] / down:>6.1f}")  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()  # ours, by its pid
            server.wait()


if __name__ == "__main__":
    main()
