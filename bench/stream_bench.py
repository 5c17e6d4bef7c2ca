"""Streaming: a 200-image tiny-model job, this tree against a baseline commit, same machine, same inputs.

Both runs are the same command (`mcs-batch segment`, a fresh local Ray, 2 CPUs) over the same 200 PNG
images (256 x 256); the baseline runs from a temporary git worktree of --baseline-commit. Printed per
run: wall time of the job, slices/s, when the first (case, target) was committed (seconds after the run
started, and as a fraction of the job's wall time), and for this tree Ray Data's per-operator task
counts from the run record. Optionally (--explain-images N) the ceiling on this machine: the same
images through `mcs-batch explain` in one process.

    .venv/bin/python bench/stream_bench.py --baseline-commit 983e104
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int, size: int = 256, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 60, (size, size), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        img[y : y + size // 3, x : x + size // 3] = 220
        Image.fromarray(img).save(folder / f"img{i:04d}.png")


def run_segment(tree: Path, images: Path, out: Path, cache: Path, extra: list[str]) -> dict:
    """One `mcs-batch segment` run from source tree `tree`; returns its figures."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "mcs_batch.cli", "segment", str(images), "--out", str(out), "--models", "tiny",
           "--prompt", "a bright lesion", "--target", "lesion", "--num-cpus", "2",
           "--set", f"models.cache_dir={cache}", *extra]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: segment failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run = json.loads(next((out / "runs").glob("*.json")).read_text())
    committed = []
    for part in (out / "catalog" / "cases").glob("*.parquet"):
        committed += pq.read_table(part, columns=["committed_at"]).column("committed_at").to_pylist()
    started = datetime.fromisoformat(run["started_at"])
    first = min(datetime.fromisoformat(c) for c in committed) - started
    wall = float(run["wall_seconds"])
    return {
        "process_seconds": process_seconds,
        "wall_seconds": wall,
        "slices": run["counts"]["slices"],
        "slices_per_s": run["counts"]["slices"] / wall,
        "first_commit_s": first.total_seconds(),
        "first_commit_fraction": first.total_seconds() / wall,
        "commit_times": sorted((datetime.fromisoformat(c) - started).total_seconds() for c in committed),
        "ray_data": run.get("ray_data"),
    }


def show(name: str, r: dict) -> None:
    times = r["commit_times"]
    quartiles = [times[int(q * (len(times) - 1))] for q in (0.25, 0.5, 0.75)]
    print(f"{name:9s} job {r['wall_seconds']:7.1f} s  {r['slices_per_s']:5.2f} slices/s  first commit at "
          f"{r['first_commit_s']:6.1f} s ({r['first_commit_fraction']:.0%} of the job); 25/50/75% of rows committed "
          f"by {quartiles[0]:.0f} / {quartiles[1]:.0f} / {quartiles[2]:.0f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--baseline-commit", default=None, help="git commit to compare with (e.g. the pre-streaming one)")
    ap.add_argument("--explain-images", type=int, default=0, help="also time explain on this many images")
    ap.add_argument("--set", action="append", default=[], help="extra --set for this tree's run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", args.images)
        cache = tmp / "cache"
        results = {}
        if args.baseline_commit:
            tree = tmp / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline_commit], cwd=REPO,
                           check=True, capture_output=True)  # fmt: skip
            try:
                results["baseline"] = run_segment(tree, tmp / "images", tmp / "out-baseline", cache, [])
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
        results["this tree"] = run_segment(REPO, tmp / "images", tmp / "out", cache, [f"--set={s}" for s in args.set])
        print(f"{args.images} PNG images 256x256, tiny models, local Ray with 2 CPUs")
        for name, r in results.items():
            show(name, r)
        if "baseline" in results:
            ratio = results["this tree"]["slices_per_s"] / results["baseline"]["slices_per_s"]
            print(f"speed-up in slices/s: {ratio:.2f}x")
        stats = results["this tree"]["ray_data"]
        if stats:
            print("Ray Data operators (this tree):")
            for op in stats.get("operators", []):
                print(f"  {op['name']:40s} tasks {op.get('tasks', '?'):>5}  blocks {op.get('blocks', '?'):>5}  "
                      f"wall {op.get('wall_s', 0):7.1f} s")  # fmt: skip
        if args.explain_images:
            n = min(args.explain_images, args.images)
            explain_in = tmp / "explain-in"
            explain_in.mkdir()
            for p in sorted((tmp / "images").glob("*.png"))[:n]:
                (explain_in / p.name).write_bytes(p.read_bytes())
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "mcs_batch.cli", "explain", str(explain_in), "--out", str(tmp / "explain"),
                   "--models", "tiny", "--prompt", "a bright lesion", "--set", f"models.cache_dir={cache}"]  # fmt: skip
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - start
            print(f"explain, one process: {n} images in {seconds:.1f} s ({n / seconds:.2f} images/s incl. loading)")


if __name__ == "__main__":
    main()
