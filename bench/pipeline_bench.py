"""End-to-end throughput of the cohort job vs a sequential reference-style loop, and memory scaling.

Part 1, same process, same images, same random weights (BiomedCLIP-size + SAM vit_b-size):
  ours:      `run_job` on a local Ray (streaming Ray Data pipeline, fast M2IB, batched SAM)
  reference: per image, as the public code runs: whole-network M2IB every step (text re-encoded),
             the saliency written to and read back from a PNG file, post-processing, coarse mask PNG,
             SamPredictor.set_image + predict(box) per box, mask PNG.
Part 2 (run first, while this process holds no model): peak memory (RSS) of the driver and of the Ray
workers for N and 10 x N cases (tiny models): it should not grow with the number of cases.

    .venv/bin/python bench/pipeline_bench.py --images 8 --reference-images 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything import SamPredictor

from mcs_batch.cluster import start_ray
from mcs_batch.config import load_config
from mcs_batch.models.biomedclip import ensemble_prompts, load_biomedclip, map_to_image
from mcs_batch.models.m2ib import m2ib_saliency
from mcs_batch.models.sam import load_sam, write_random_sam
from mcs_batch.models.tiny import write_tiny_biomedclip
from mcs_batch.models.visual_prompts import largest_components, visual_prompts
from mcs_batch.pipeline import run_job
from mcs_batch.seeding import case_rng, torch_generator

PROMPTS = ["a bright lesion", "a well defined bright mass"]


def write_images(folder: Path, n: int, size=(256, 320), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = rng.integers(0, 60, size, dtype=np.uint8)
        h, w = size[0] // 3, size[1] // 3
        y, x = rng.integers(0, size[0] - h), rng.integers(0, size[1] - w)
        img[y : y + h, x : x + w] = 220
        paths.append(folder / f"img{i:04d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


class PeakRss:
    """Samples the RSS of this process and of Ray worker processes every 0.2 s."""

    def __init__(self):
        self.driver = self.worker_max = self.workers_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(pid: str) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        me = str(os.getpid())
        while not self._stop.is_set():
            self.driver = max(self.driver, self._rss(me))
            total = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if b"ray::" in cmd or b"default_worker.py" in cmd:
                    rss = self._rss(pid)
                    total += rss
                    self.worker_max = max(self.worker_max, rss)
            self.workers_total = max(self.workers_total, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def job_config(inputs: Path, out: Path, overrides: list[str], preset: str | None = None):
    return load_config(
        preset=preset,
        prompts=PROMPTS,
        target="lesion",
        overrides=[f"inputs.uris={json.dumps([str(inputs)])}", f"outputs.uri={json.dumps(str(out))}", *overrides],
    )


def reference_loop(paths: list[Path], clip_dir: Path, sam_path: Path, variant: str, work: Path, *, cfg, threads: int):
    """The public code's way, one image at a time, with intermediate PNG files."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    clip = load_biomedclip(clip_dir)
    sam = load_sam(variant, sam_path)
    predictor = SamPredictor(sam)
    target = cfg.targets[0]
    text = clip.encode_prompts(target.prompts)[None]
    work.mkdir(parents=True, exist_ok=True)
    clip.model.requires_grad_(True)  # the public code computes gradients for every weight
    for i, path in enumerate(paths):
        image = np.asarray(Image.open(path).convert("RGB"))
        pixels, geometry = clip.to_clip_input([image], cfg.clip.resize)
        maps = m2ib_saliency(
            clip.model.visual, pixels, text, [torch_generator(cfg.seed, "ref", i)], cfg.m2ib, mode="reference",
            text_encoder=lambda _b: ensemble_prompts(clip.text_encoder(target.prompts)),  # re-encoded every step
        )  # fmt: skip
        saliency = map_to_image(maps[0], geometry[0])
        Image.fromarray((saliency * 255).astype(np.uint8)).save(work / f"{path.stem}_saliency.png")
        saliency = np.asarray(Image.open(work / f"{path.stem}_saliency.png"), np.float32) / 255.0
        prompts = visual_prompts(saliency, target.coarse, rng=case_rng(cfg.seed, "ref", i))
        Image.fromarray(prompts.coarse_mask.astype(np.uint8) * 255).save(work / f"{path.stem}_coarse.png")
        predictor.set_image(image)
        mask = np.zeros(image.shape[:2], bool)
        for box in prompts.boxes_xyxy:
            masks, _, _ = predictor.predict(box=box, multimask_output=False)
            mask |= masks[0]
        mask = largest_components(mask, target.coarse.k_components)
        Image.fromarray(mask.astype(np.uint8) * 255).save(work / f"{path.stem}_mask.png")
    clip.model.requires_grad_(False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images for the pipeline")
    ap.add_argument("--reference-images", type=int, default=4, help="images for the (slow) reference loop")
    ap.add_argument("--size", choices=["base", "tiny"], default="base", help="BiomedCLIP size (random weights)")
    ap.add_argument("--sam", choices=["vit_b", "tiny"], default="vit_b")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the reference loop")
    ap.add_argument("--actor-threads", type=int, default=2, help="torch threads per model actor of the pipeline")
    ap.add_argument("--memory-cases", type=int, default=20, help="N for the memory check (N and 10 N)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start_ray(None, num_cpus=2, object_store_mb=1024)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        tmp = Path(tmp)
        if not args.skip_memory:
            n = args.memory_cases
            overrides = [f"models.cache_dir={tmp / 'cache'}", "resources.saliency_batch=8", "resources.sam_batch=8"]
            for count in (n, 10 * n):
                write_images(tmp / f"mem{count}", count, size=(64, 64), seed=count)
                with PeakRss() as peak:
                    t0 = time.perf_counter()
                    summary = run_job(
                        job_config(tmp / f"mem{count}", tmp / f"memout{count}", overrides, preset="tiny"),
                        progress=lambda m: None,
                    )
                    seconds = time.perf_counter() - t0
                mib = 2**20
                print(f"memory, {count:5d} cases (tiny models): driver peak {peak.driver / mib:7.0f} MiB, "
                      f"largest worker {peak.worker_max / mib:6.0f} MiB, "
                      f"all workers {peak.workers_total / mib:6.0f} MiB, "
                      f"{summary.cases} cases in {seconds:.1f} s")  # fmt: skip
        if not args.skip_throughput:
            paths = write_images(tmp / "images", args.images)
            clip_dir = write_tiny_biomedclip(tmp / "clip", seed=0, size=args.size)
            sam_path = write_random_sam(tmp / "sam.pth", args.sam, seed=0)
            layer = 9 if args.size == "base" else 4
            overrides = [f"models.clip={json.dumps(str(clip_dir))}", f"models.sam={json.dumps(str(sam_path))}",
                         f"models.sam_variant={args.sam}", f"m2ib.layer={layer}", f"models.cache_dir={tmp / 'cache'}",
                         f"resources.torch_threads={args.actor_threads}", "resources.saliency_batch=4",
                         "resources.sam_batch=2"]  # fmt: skip
            print(f"{args.images} images 256x320, BiomedCLIP {args.size} + SAM {args.sam} (random weights), 2 CPUs")
            t0 = time.perf_counter()
            cfg = job_config(tmp / "images", tmp / "out", overrides)
            summary = run_job(cfg, progress=lambda m: None)
            ours = time.perf_counter() - t0
            assert summary.by_status == {"ok": args.images}, summary.by_status
            print(f"pipeline (run_job, incl. model loading):   {ours:8.1f} s  {args.images / ours:.4f} images/s  "
                  f"{ours / args.images:7.1f} s/image")  # fmt: skip
            n_ref = min(args.reference_images, args.images)
            if n_ref:
                ref = reference_loop(
                    paths[:n_ref], clip_dir, sam_path, args.sam, tmp / "ref", cfg=cfg, threads=args.threads
                )
                print(f"reference loop (sequential, incl. loading): {ref:8.1f} s  {n_ref / ref:.4f} images/s  "
                      f"{ref / n_ref:7.1f} s/image")  # fmt: skip
                print(f"ratio (s/image reference / s/image pipeline): {ref / n_ref / (ours / args.images):.2f}x")


if __name__ == "__main__":
    main()
