"""A simulated GPU cluster: does throughput follow the drivers, and does the capacity model predict it?

ray.cluster_utils.Cluster starts a head and --gpu-nodes worker nodes declaring one GPU each (fake:
Ray schedules by them; nothing uses CUDA). The model actors are bench-only stand-ins (never a default:
they exist in this file) that sleep --gpu-ms per slice in each model stage (sleeping costs no CPU, as
waiting on a GPU does not) and otherwise return what bench/driver_bench.py's no-op stand-ins return.
Inputs: --images pre-generated PNG images (one slice each: the most driver work per slice there is).

For 1, 2 and 4 shard drivers (resources.drivers), each run into a fresh OUT, printed: aggregate
slices/s, each driver's CPU seconds and share of a core, the machine's CPU use; and the model's
prediction, from figures measured in the 1-driver run of the same process:

    predicted slices/s = min(GPUs / gpu_s,  N / driver_cpu_s,  cores / cpu_s)

gpu_s: --gpu-ms (the slower model stage, per slice, on one GPU); driver_cpu_s: driver CPU per slice;
cpu_s: CPU per slice of the whole machine (every process: decode, parts, grouper, drivers) in the
1-driver run; cores: this machine's. Two regimes are run: GPU-bound (--gpu-ms large) and CPU-bound
(--gpu-ms small). Run it on a quiet machine (nothing else using the cores):

    .venv/bin/python bench/scale_sim.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from driver_bench import sleeping


def machine_cpu_s() -> float:
    """CPU seconds every process of this machine has used (user + system), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(x) for x in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):  # ten folders: ten listing prefixes, so that every shard gets whole ones
        sub = folder / f"p{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(sub / f"img{i:05d}.png")


def run(inputs: Path, out: Path, cache: Path, drivers: int, gpu_ms: float) -> dict:
    from mcs_batch.config import load_config
    from mcs_batch.pipeline import run_job
    from mcs_batch.pipeline.graph import ModelStages

    saliency, sam = sleeping(gpu_ms)
    cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion", inputs=[str(inputs)], out=str(out),
                      overrides=[f"models.cache_dir={cache}", f"resources.drivers={drivers}",
                                 "inputs.wave_objects=50"])  # fmt: skip
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    machine_before = machine_cpu_s()
    start = time.perf_counter()
    summary = run_job(cfg, progress=lambda m: None, stages=ModelStages(saliency=saliency, masking=sam))
    wall = time.perf_counter() - start
    machine = machine_cpu_s() - machine_before
    after = resource.getrusage(resource.RUSAGE_SELF)
    own = (after.ru_utime - self_before.ru_utime) + (after.ru_stime - self_before.ru_stime)
    record = json.loads((out / "runs" / f"{summary.run_id}.json").read_text())
    drivers_cpu = [s["driver_cpu_s"] for s in record.get("shards", [])] or [own]
    assert summary.by_status == {"ok": summary.cases}, summary.by_status
    return {"slices": summary.slices, "wall": wall, "machine_cpu": machine, "drivers_cpu": drivers_cpu,
            "parent_cpu": own if record.get("shards") else 0.0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--gpu-nodes", type=int, default=4)
    ap.add_argument("--gpu-ms", type=float, action="append", default=None,
                    help="GPU time per slice and model stage, ms (repeatable; default 40 and 1)")  # fmt: skip
    ap.add_argument("--drivers", type=int, action="append", default=None, help="default 1, 2, 4")
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="scale-sim-") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "in", args.images, args.size)
        common = {"object_store_memory": 256 * 2**20, "include_dashboard": False}
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "temp_dir": str(tmp / "ray"), **common})
        for _ in range(args.gpu_nodes):
            cluster.add_node(num_cpus=2, num_gpus=1, **common)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the 1-driver run's executor is this process
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"{args.images} PNG images {args.size}x{args.size}; {args.gpu_nodes} fake GPUs; {cores} real cores",
              flush=True)  # fmt: skip
        try:
            for gpu_ms in args.gpu_ms or [40.0, 1.0]:
                gpu_cap = args.gpu_nodes / (gpu_ms / 1000)
                base = None
                for n, drivers in enumerate(args.drivers or [1, 2, 4]):
                    r = run(tmp / "in", tmp / f"out-{gpu_ms:g}-{drivers}", tmp / "cache", drivers, gpu_ms)
                    rate = r["slices"] / r["wall"]
                    if base is None:
                        base = {"driver_s": sum(r["drivers_cpu"]) / r["slices"],
                                "cpu_s": r["machine_cpu"] / r["slices"]}  # fmt: skip
                    predicted = min(gpu_cap, drivers / base["driver_s"], cores / base["cpu_s"])
                    limit = min(("GPUs", gpu_cap), ("drivers", drivers / base["driver_s"]),
                                ("cores", cores / base["cpu_s"]), key=lambda kv: kv[1])[0]  # fmt: skip
                    shares = ", ".join(f"{c:.1f} s ({c / r['wall']:.0%} of a core)" for c in r["drivers_cpu"])
                    print(f"gpu {gpu_ms:5.1f} ms/slice  drivers {drivers}: {rate:7.1f} slices/s measured, "
                          f"{predicted:7.1f} predicted ({limit}-bound; {rate / predicted - 1:+.0%}); "
                          f"{r['wall']:.1f} s; driver CPU {shares}; parent {r['parent_cpu']:.1f} s; "
                          f"machine CPU {r['machine_cpu'] / r['wall'] / cores:.0%} of {cores} cores"
                          + ("" if n else f"  [1-driver figures: driver {1000 * base['driver_s']:.2f} ms/slice, "
                             f"machine {1000 * base['cpu_s']:.2f} ms/slice; GPU capacity {gpu_cap:.0f} slices/s]"),
                          flush=True)  # fmt: skip
        finally:
            ray.shutdown()
            cluster.shutdown()


if __name__ == "__main__":
    main()
