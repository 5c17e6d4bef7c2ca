"""Driver work per slice and the framework's own throughput, with no-op models.

The models are replaced by bench-only stand-ins (NoopSaliency: a fixed saliency map with one bright
square; NoopSam: a fixed mask, that square), so what is measured is everything else: listing, header
scan, grouping, decoding, windowing, prompts, staging, mask assembly and writing, commits, Ray Data.
The stand-ins exist only in this file; the job never uses them.

Two inputs: 1,000 PNG images (256 x 256) and one NIfTI volume of 600 slices (512 x 512, int16), each
also at a tenth of the size (100 images, 60 slices); --images and --volume-slices make them smaller.
For each input, each block size (resources.block_rows, --block-rows: 32, 128 and 256 by default) and
each source tree (this one, and --baseline-commit from a temporary git worktree, same block size), a
fresh process starts a local Ray with 2 CPUs and runs the job, and the driver process's CPU seconds
(user + system, all its threads: Ray Data's executor, the rows' iterator, the commits' native threads)
are measured around `run_job`. Four runs each: the small and the large archive, the large one again with
the stand-ins sleeping per slice (the same work in about twice the time), and the small one with them
sleeping until it lasts about as long as the large one. The driver's CPU is

    fixed (start-up, finish) + per_second x wall (Ray Data's scheduling loop, polls) + per_slice x slices

per_second from the two large runs; per_slice from the large run and the small one stretched to about
its wall (stand-ins sleeping), the per-second part of what is left of their difference taken off. A
per_slice at or below zero means it is below what these runs resolve (capacity "inf"). On a 2-core
machine a job runs at tens to hundreds of slices/s, so the per-second part, which does not grow with
the rate, is most of "CPU per slice" here; on a cluster at thousands of slices/s it is a small share.
Printed per input and block size, each tree on a line:
- slices/s of the job and per CPU core (the large run), and per core more (large minus small run);
- the driver's CPU per slice of the large run, and per slice more (large minus small run);
- the split: share of a core per second of the job, CPU per slice;
- the driver's capacity: slices/s at which it would use one whole core, (1 - per_second) / per_slice
  (and 1 / CPU per slice more, the older figure that counts the per-second part as per slice).
Then a table of capacities, baseline beside this tree.

    .venv/bin/python bench/driver_bench.py --baseline-commit 505ea85
    .venv/bin/python bench/driver_bench.py --baseline-commit 505ea85 --images 400 --volume-slices 300"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CPUS = 2
RESULT = "driver-bench-result: "


class NoopSaliency:
    """Bench-only stand-in for SaliencyStage: a fixed map (0.1, with 0.9 in the middle third)."""

    def __init__(self, cfg, storage=None, **_):
        from mcs_batch.pipeline import graph

        self.cfg, self.n_targets = cfg, len(cfg.targets)
        self.with_prompts = "prompts_batch" not in vars(graph)  # trees where the M2IB actor makes prompts

    def __call__(self, batch: dict) -> dict:
        n = len(batch["case_id"])
        maps = []
        for image, code in zip(batch["image"], batch["error_code"], strict=True):
            h, w = image.shape[:2]
            m = np.full((h, w), 0.1, np.float32)
            if not code and h > 2 and w > 2:
                m[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 0.9
            maps.append(m)
        for j in range(self.n_targets):
            batch[f"t{j}_saliency"] = maps
        batch["saliency_s"] = np.zeros(n)
        batch["saliency_at"] = np.full(n, time.time())
        batch["clip_sha256"] = np.array(["0" * 64] * n, dtype=object)
        batch["models_tiny"] = np.full(n, True)
        if self.with_prompts:
            from mcs_batch.stages.prompts import prompts_batch

            return prompts_batch(batch, cfg=self.cfg)
        return batch


class NoopSam:
    """Bench-only stand-in for SamStage: the middle third of the slice as the mask."""

    def __init__(self, cfg, storage=None, **_):
        self.n_targets = len(cfg.targets)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["case_id"])
        masks, pixels = [], []
        heights, widths = np.zeros(n, np.int64), np.zeros(n, np.int64)
        rows = zip(batch["image"], batch["error_code"], batch["slice_index"], strict=True)
        for i, (image, code, k) in enumerate(rows):
            if code or int(k) < 0:
                masks.append(b"")
                pixels.append(0)
                continue
            h, w = image.shape[:2]
            heights[i], widths[i] = h, w
            m = np.zeros((h, w), bool)
            m[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = True
            masks.append(np.packbits(m.ravel()).tobytes())
            pixels.append(int(m.sum()))
        del batch["image"]
        for j in range(self.n_targets):
            batch.pop(f"t{j}_premask", None)
            batch[f"t{j}_mask"] = np.array(masks, dtype=object)
            batch[f"t{j}_score"] = np.full(n, 0.9)
            batch[f"t{j}_pixels"] = np.array(pixels, np.int64)
        batch["height"], batch["width"] = heights, widths
        batch["sam_s"] = np.zeros(n)
        batch["sam_at"] = np.full(n, time.time())
        batch["sam_sha256"] = np.array(["0" * 64] * n, dtype=object)
        batch["models_tiny"] = np.full(n, True)
        return batch


class SleepSaliency(NoopSaliency):
    """Bench-only: NoopSaliency after sleeping `gpu_s` per slice (sleeping costs no CPU, as waiting on a
    GPU does not). Subclassed with the time set (`sleeping`)."""

    gpu_s = 0.0

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.gpu_s * len(batch["case_id"]))
        return super().__call__(batch)


class SleepSam(NoopSam):
    """Bench-only: NoopSam after sleeping `gpu_s` per slice."""

    gpu_s = 0.0

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.gpu_s * len(batch["case_id"]))
        return super().__call__(batch)


def sleeping(gpu_ms: float) -> tuple[type, type]:
    """The stand-ins, sleeping `gpu_ms` per slice in each model stage."""
    return (type("SleepSaliency", (SleepSaliency,), {"gpu_s": gpu_ms / 1000}),
            type("SleepSam", (SleepSam,), {"gpu_s": gpu_ms / 1000}))  # fmt: skip


def make_inputs(root: Path, *, images: int = 1000, volume_slices: int = 600) -> dict[str, list[tuple[Path, int]]]:
    """Per input kind, a small (a tenth) and a large archive of it: the difference between the two runs
    is what grows with the archive (the large run's total also holds the job's fixed start-up and finish)."""
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    image_label, volume_label = f"{images} images 256x256", f"{volume_slices}-slice volume 512x512"
    inputs: dict[str, list[tuple[Path, int]]] = {image_label: [], volume_label: []}
    for n in (max(1, images // 10), images):
        folder = root / f"images-{n}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(folder / f"img{i:04d}.png")
        inputs[image_label].append((folder, n))
    for k in (max(1, volume_slices // 10), volume_slices):
        volume = root / f"volume-{k}"
        volume.mkdir()
        data = rng.integers(-1000, 1000, (512, 512, k), dtype=np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 1.0, 1.0])), volume / "ct.nii.gz")
        inputs[volume_label].append((volume, k))
    return inputs


class ThreadCpu:
    """CPU seconds of this process's threads by what they are, sampled from /proc/self/task every
    0.2 s (a thread's last 0.2 s before it ends may be missed): Python threads by name (Ray Data's
    executor "StreamingExecutor-...", the rows' iterator "mcs-batch-rows", the driver's loop
    "MainThread", ...), threads Python does not know (delta-rs' and Ray's native threads) as "native"."""

    def __init__(self) -> None:
        import threading

        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, name="bench-thread-cpu", daemon=True)
        self._thread.start()

    def _sample(self, first: bool = False) -> None:
        import re
        import threading

        for t in threading.enumerate():
            if t.native_id is not None:
                self.names[t.native_id] = re.sub(r"[-_]?[0-9a-zA-Z]{20,}.*$|[-_]\d+$", "", t.name)
        for task in Path("/proc/self/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            if first:
                self.first[int(task.name)] = ticks
            self.last[int(task.name)] = ticks

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for tid, ticks in self.last.items():
            name = self.names.get(tid, "native")
            if name == "bench-thread-cpu":
                continue
            out[name] = out.get(name, 0.0) + (ticks - self.first.get(tid, 0)) / tick
        return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def runner(inputs: str, out: str, extra: tuple[str, ...] = (), gpu_ms: float = 0.0) -> None:
    """Inside the measured process (PYTHONPATH = the tree under test): run the job, print figures.
    extra: --set overrides (this tree only); gpu_ms: the stand-ins sleep this long per slice."""
    from mcs_batch.cluster import start_ray
    from mcs_batch.config import load_config
    from mcs_batch.pipeline import graph, run_job

    start_ray(None, num_cpus=CPUS, object_store_mb=2048)
    where = [f"inputs.uris={json.dumps([inputs])}", f"outputs.uri={json.dumps(out)}"]  # any tree's config
    cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion",
                      overrides=[*where, f"models.cache_dir={out}-cache", *extra])  # fmt: skip
    kwargs = {}
    saliency, masking = sleeping(gpu_ms) if gpu_ms else (NoopSaliency, NoopSam)
    if hasattr(graph, "ModelStages"):  # this tree: the stand-ins are passed in
        kwargs["stages"] = graph.ModelStages(saliency=saliency, masking=masking)
    else:  # trees before it: the graph module's names are replaced (the actors pickle these classes by value)
        graph.SaliencyStage, graph.SamStage = saliency, masking
    threads = ThreadCpu()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = run_job(cfg, progress=lambda m: None, **kwargs)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    by_thread = threads.stop()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(RESULT + json.dumps({"slices": summary.slices, "cases": summary.cases, "wall": wall, "driver_cpu": cpu,
                                      "threads": by_thread,
                      "by_status": summary.by_status}))  # fmt: skip


def measure(tree: Path, inputs: Path, out: Path, extra: tuple[str, ...] = (), gpu_ms: float = 0.0) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{Path(__file__).parent}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    call = f"import driver_bench as b; b.runner({str(inputs)!r}, {str(out)!r}, {tuple(extra)!r}, {gpu_ms!r})"
    proc = subprocess.run([sys.executable, "-c", call], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT))
    return json.loads(line.removeprefix(RESULT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-commit", default=None)
    ap.add_argument("--only", choices=["images", "volume"], default=None)
    ap.add_argument("--images", type=int, default=1000, help="2D images of the large run (a tenth in the small)")
    ap.add_argument("--volume-slices", type=int, default=600, help="slices of the large run's volume (a tenth ...)")
    ap.add_argument("--block-rows", default="32,128,256", help="resources.block_rows values, comma-separated")
    ap.add_argument("--set", action="append", default=[], help="more config overrides for this tree's runs")
    args = ap.parse_args()
    blocks = [int(b) for b in args.block_rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="driver-bench-") as tmp:
        tmp = Path(tmp)
        inputs = make_inputs(tmp / "in", images=args.images, volume_slices=args.volume_slices)
        trees = {"this tree": REPO}
        if args.baseline_commit:
            trees = {"baseline": tmp / "baseline", **trees}
            subprocess.run(["git", "worktree", "add", "--detach", str(trees["baseline"]), args.baseline_commit],
                           cwd=REPO, check=True, capture_output=True)  # fmt: skip
        try:
            results = {}
            for label, sizes in inputs.items():
                if args.only and args.only not in label:
                    continue
                for block in blocks:
                    for name, tree in trees.items():
                        extra = (f"resources.block_rows={block}", *(args.set if name == "this tree" else ()))
                        results[(label, block, name)] = r = _measure_pair(tree, sizes, tmp, name, extra)
                        print(f"{label:26s} blocks {block:3d} {name:9s} {r['rate']:7.1f} slices/s "
                              f"({r['rate'] / CPUS:6.1f} per core; {r['steady'] / CPUS:6.1f} per core more)  driver "
                              f"CPU {1000 * r['total']:6.3f} ms per slice of the large run, {1000 * r['marginal']:6.3f}"
                              f" ms per slice more; split: {100 * r['per_second']:4.1f}% of a core per second of the "
                              f"job + {1000 * r['per_slice']:6.3f} ms per slice (walls small, large, large slow, "
                              f"small stretched: {r['walls']} s): "
                              f"capacity {r['capacity']:7.0f} slices/s (from the slices more alone: "
                              f"{_capacity(r['marginal'])})", flush=True)  # fmt: skip
                        print("    driver threads, ms of CPU per slice, large run (small run): " + ", ".join(
                            f"{k} {1000 * v:.3f} ({1000 * w:.3f})" for k, (v, w) in r["threads"].items()),
                            flush=True)  # fmt: skip
            _table(results, trees, blocks)
        finally:
            if args.baseline_commit:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=REPO,
                               capture_output=True)  # fmt: skip


def _measure_pair(tree: Path, sizes: list[tuple[Path, int]], tmp: Path, name: str, extra: tuple[str, ...]) -> dict:
    """Four runs of one input in one tree: the small and the large archive as fast as they go, the large
    one with the stand-ins sleeping (the same work in more time), and the small one sleeping so that it
    lasts about as long as the large fast run. The driver's CPU is

        fixed + per_second * wall + per_slice * slices

    per_second from the two large runs (same slices, different walls); per_slice from the large fast run
    and the small slow one (about the same wall: the per-second part, estimated, is a small correction)."""
    def run(path: Path, slices: int, gpu_ms: float = 0.0) -> dict:
        out = tmp / f"out-{name.replace(' ', '-')}-{path.name}-{len(list(tmp.glob('out-*')))}"
        r = measure(tree, path, out, extra, gpu_ms)
        assert r["slices"] == slices, r
        return r

    (small_path, small_n), (large_path, large_n) = sizes
    small, large = run(small_path, small_n), run(large_path, large_n)
    slow = run(large_path, large_n, 500 * large["wall"] / large_n)  # about one more large run's time
    # the small archive stretched to the large run's wall (the stand-ins' sleep is split over 2 stages)
    stretched = run(small_path, small_n, 500 * max(0.0, large["wall"] - small["wall"]) / small_n)
    more = large["slices"] - small["slices"]
    per_second = max(0.0, (slow["driver_cpu"] - large["driver_cpu"]) / (slow["wall"] - large["wall"]))
    left = large["driver_cpu"] - stretched["driver_cpu"] - per_second * (large["wall"] - stretched["wall"])
    per_slice = left / more
    return {
        "rate": large["slices"] / large["wall"],
        "steady": more / (large["wall"] - small["wall"]) if large["wall"] > small["wall"] else float("nan"),
        "total": large["driver_cpu"] / large["slices"],
        "marginal": (large["driver_cpu"] - small["driver_cpu"]) / more,
        "per_second": per_second,
        "per_slice": per_slice,
        "capacity": (1 - per_second) / per_slice if per_slice > 0 else float("inf"),
        "walls": [round(r["wall"], 1) for r in (small, large, slow, stretched)],
        # each thread's CPU per slice, the large run (what a thread spends of it grows with the slices
        # where the large run spends more per slice than the small one)
        "threads": {k: (v / large["slices"], small["threads"].get(k, 0.0) / small["slices"])
                    for k, v in large["threads"].items()},
    }


def _capacity(cpu_per_slice: float) -> str:
    """Slices/s at which the driver would use one whole core ("n/a": the large run cost the driver no
    more CPU than the small one, a machine too busy to tell)."""
    return f"{1 / cpu_per_slice:7.0f}" if cpu_per_slice > 0 else "    n/a"


def _table(results: dict, trees: dict, blocks: list[int]) -> None:
    print("\ndriver capacity: slices/s at which the driver would use one whole core, (1 - per second) / per slice; "
          "then the driver's CPU per slice and its share of a core per second of the job; in brackets the older "
          "figure, 1 / CPU per slice more (the time-driven part counted as per slice)")  # fmt: skip
    labels = list(dict.fromkeys(label for label, _, _ in results))
    print(f"{'input':26s} {'block':>5s} " + " ".join(f"{name:>36s}" for name in trees))
    for label in labels:
        for block in blocks:
            cells = []
            for name in trees:
                r = results.get((label, block, name))
                cells.append(f"{r['capacity']:7.0f} {1000 * r['per_slice']:6.3f}ms {100 * r['per_second']:4.1f}% "
                             f"({_capacity(r['marginal'])})" if r else "-")  # fmt: skip
            print(f"{label:26s} {block:5d} " + " ".join(f"{c:>36s}" for c in cells))


if __name__ == "__main__":
    main()
