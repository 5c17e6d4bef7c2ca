"""GPU benchmark in one command, for a single-GPU machine: slices/s per stage and end to end.

    python bench/gpu_bench.py                      # bf16, SAM vit_b and vit_h, BiomedCLIP-size CLIP
    python bench/gpu_bench.py --smoke              # the same code on CPU with tiny models (a check)

Stages, each timed after a warm-up on the same random-weight models:
  noise     M2IB's noise draws for one image (steps x (samples, 197, 768)): on a CPU generator, and on
            the model's device (what the job does, mcs_batch.seeding): CPU time per image spent on noise
  m2ib      fast M2IB (prefix once, alpha-only gradients), batched, autocast precision
  sam_embed SAM image encoder, batched (vit_b, vit_h)
  sam_full  encoder + box-prompted decoder per slice
  job       run_job end to end on a synthetic CT series + PNGs (local Ray, `resources: auto`: one M2IB and
            one SAM actor sharing the GPU), with the GPU's utilisation sampled by nvidia-smi every 0.2 s:
            mean utilisation, and the fraction of samples at 0% (the GPU waiting for input)
Prints one line per measurement and writes them as JSON (--json, default $OUT/gpu_bench.json if OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcs_batch.cluster import start_ray
from mcs_batch.config import load_config
from mcs_batch.models.biomedclip import load_biomedclip
from mcs_batch.models.m2ib import M2IBSettings, m2ib_from_prefix, vision_prefix
from mcs_batch.models.sam import SamSegmenter, load_sam, write_random_sam
from mcs_batch.models.tiny import write_tiny_biomedclip
from mcs_batch.pipeline import run_job
from mcs_batch.seeding import torch_generator
from mcs_batch.testdata.series import write_series


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (kernels, autotuning, allocator)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


class GpuSampler:
    """nvidia-smi's utilization.gpu every `period` s in a thread (empty without nvidia-smi)."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"]
        while not self._stop.is_set():
            try:
                self.samples.append(float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout))
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.period)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_idle_fraction": None}
        return {"gpu_util_mean": sum(self.samples) / len(self.samples),
                "gpu_idle_fraction": sum(1 for s in self.samples if s == 0) / len(self.samples)}  # fmt: skip


def images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        img[size // 4 : size // 2, size // 3 : 2 * size // 3] = 220
        out.append(img)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, few slices: checks the script runs")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--variants", default="vit_b,vit_h")
    ap.add_argument("--m2ib-batch", type=int, default=32)
    ap.add_argument("--sam-batch", type=int, default=16)
    ap.add_argument("--job-slices", type=int, default=96, help="slices in the end-to-end job")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (use --smoke for a CPU check)")
    device = torch.device("cpu" if smoke else "cuda")
    precision = "fp32" if smoke else args.precision
    size = "tiny" if smoke else "base"
    variants = ["tiny"] if smoke else args.variants.split(",")
    m2ib_batch, sam_batch = (2, 2) if smoke else (args.m2ib_batch, args.sam_batch)
    job_slices = 6 if smoke else args.job_slices
    results: list[dict] = []

    def report(stage: str, variant: str, batch: int, seconds_per_batch: float, **extra) -> None:
        rate = batch / seconds_per_batch
        results.append({"stage": stage, "variant": variant, "batch": batch, "precision": precision,
                        "slices_per_s": rate, **extra})  # fmt: skip
        print(f"{stage:9s} {variant:6s} batch {batch:3d} {precision:5s}: {rate:9.2f} slices/s", flush=True)

    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        tmp = Path(tmp)
        clip_dir = write_tiny_biomedclip(tmp / "clip", seed=0, size=size)
        clip = load_biomedclip(clip_dir, device=str(device))
        settings = M2IBSettings(layer=9 if size == "base" else 4, precision=precision)
        batch_images = images(m2ib_batch, 512)
        pixels, _ = clip.to_clip_input(batch_images, "resize")
        text = clip.encode_prompts(["a bright lesion"]).to(device)[None].expand(m2ib_batch, -1)

        visual = clip.model.visual
        shape = (settings.samples, 197, 768)
        for where in ("cpu", device.type):  # the noise of one image: every step's draw

            def draws(where=where):
                g = torch_generator(0, "bench", 0, where)
                cpu0 = time.process_time()
                for _ in range(settings.steps):
                    torch.randn(shape, generator=g, device=where)
                return time.process_time() - cpu0

            seconds = timed(draws, torch.device(where), args.repeats)
            cpu_seconds = draws()
            results.append({"stage": "noise", "variant": where, "seconds_per_image": seconds,
                            "cpu_seconds_per_image": cpu_seconds})  # fmt: skip
            print(f"noise     {where:6s} {1000 * seconds:8.1f} ms per image, {1000 * cpu_seconds:8.1f} ms of CPU",
                  flush=True)  # fmt: skip

        def m2ib():
            prefix = vision_prefix(visual, pixels, settings)
            gens = [torch_generator(0, "bench", i, device) for i in range(m2ib_batch)]
            return m2ib_from_prefix(visual, prefix, text, gens, settings)

        report("m2ib", size, m2ib_batch, timed(m2ib, device, args.repeats))

        sam_paths = {}
        for variant in variants:
            sam_paths[variant] = write_random_sam(tmp / f"sam_{variant}.pth", variant, seed=0)
            segmenter = SamSegmenter(load_sam(variant, sam_paths[variant], device=str(device)), precision=precision)
            imgs = images(sam_batch, 512)
            box = np.array([[100, 100, 300, 300]], np.float32)
            report("sam_embed", variant, sam_batch, timed(lambda s=segmenter, i=imgs: s.embed(i), device, args.repeats))

            def full(s=segmenter, i=imgs, b=box):
                e = s.embed(i)
                return [s.segment(e, k, b) for k in range(len(i))]

            report("sam_full", variant, sam_batch, timed(full, device, args.repeats))
            del segmenter
            if device.type == "cuda":
                torch.cuda.empty_cache()

        # end to end: a synthetic CT series (most slices) plus a few PNGs, both model pools on the GPU
        archive = tmp / "archive"
        n_png = max(1, job_slices // 8)
        write_series(archive / "ct", rows=512 if not smoke else 64, cols=512 if not smoke else 64,
                     n_slices=job_slices - n_png, series_seed="gpu-bench")  # fmt: skip
        (archive / "png").mkdir()
        for i, img in enumerate(images(n_png, 512 if not smoke else 64, seed=1)):
            Image.fromarray(img).save(archive / "png" / f"{i}.png")
        start_ray(None, num_cpus=os.cpu_count() if not smoke else 2, object_store_mb=4096 if not smoke else 512)
        for variant in variants:
            cfg = load_config(prompts=["a bright lesion"], target="lesion", overrides=[
                f"inputs.uris={json.dumps([str(archive)])}", f"outputs.uri={json.dumps(str(tmp / f'out-{variant}'))}",
                f"models.clip={json.dumps(str(clip_dir))}",
                "models.sam=tiny" if variant == "tiny" else f"models.sam={json.dumps(str(sam_paths[variant]))}",
                f"models.sam_variant={'vit_b' if variant == 'tiny' else variant}", f"models.cache_dir={tmp / 'cache'}",
                f"m2ib.layer={settings.layer}", f"m2ib.precision={precision}", f"models.sam_precision={precision}",
                f"resources.saliency_batch={m2ib_batch}", f"resources.sam_batch={sam_batch}",
            ])  # fmt: skip
            t0 = time.perf_counter()
            with GpuSampler() as gpu:
                summary = run_job(cfg, progress=lambda m: None)
            seconds = time.perf_counter() - t0
            util = gpu.summary()
            results.append({"stage": "job", "variant": variant, "precision": precision, "slices": summary.slices,
                            "seconds": seconds, "slices_per_s": summary.slices / seconds,
                            "by_status": summary.by_status, **util})  # fmt: skip
            shown = ""
            if util["gpu_util_mean"] is not None:
                shown = f"; GPU busy {util['gpu_util_mean']:.0f}% on average, idle in "
                shown += f"{util['gpu_idle_fraction']:.0%} of samples"
            print(
                f"job       {variant:6s} {summary.slices} slices {precision:5s}: {summary.slices / seconds:9.2f} "
                f"slices/s end to end ({seconds:.1f} s incl. actor start-up; {summary.by_status}{shown})",
                flush=True,
            )
    target = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(json.dumps(results, indent=2))
        print(f"results written to {target}")


if __name__ == "__main__":
    main()
