"""Peak memory of the refine predictor for 1 member and for many, on a realistic nnU-Net 2d ensemble.

    .venv/bin/python bench/refine_memory_bench.py                            # 512 px, ~46 M parameters, 1 and 30
    .venv/bin/python bench/refine_memory_bench.py --members 1 30 --held      # also the members held at once
    .venv/bin/python bench/refine_memory_bench.py --image-size 64 --base-features 4 --members 1 4  # quick

Writes a random-weight ensemble in train-weak's format (synthetic_ensemble.write_random_ensemble: nnU-Net's
plans for RGB PNGs of that size, PlainConvUNet, state dicts with sha256) of max(--members) members, then
measures each configuration in a fresh Python process (peak RSS = /proc/self/status VmHWM of that
process; ru_maxrss of a child would start from the parent's peak over fork): the process builds an
EnsemblePredictor over the newest N members and refines --images images through `moments`, as refine
does. `--held` adds the previous way: every member's state dict loaded into memory at once (as the
predictor did before the members were streamed), then `probabilities` per image.
Prints one line per measurement and the ratio of N members to 1 member.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_kib(field: str = "VmHWM") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(work: str, members: int, n_images: int, size: int, held: bool) -> dict:
    """One measurement, in this (fresh) process."""
    import io

    import numpy as np
    import torch

    from mcs_batch.train.weak.ensemble import EnsemblePredictor

    torch.set_num_threads(2)
    baseline = _peak_kib("VmRSS")
    predictor = EnsemblePredictor(work, storage=None, max_members=members)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n_images)]
    started = time.perf_counter()
    if held:  # the previous predictor: every state dict in memory, maps [M, H, W] per image
        weights = [torch.load(io.BytesIO(m.path.read_bytes()), map_location="cpu", weights_only=True)
                   for m in predictor.members]  # fmt: skip
        means = []
        for image in images:
            maps = []
            for w in weights:
                predictor.network.load_state_dict(w)
                maps.append(_one(predictor, image))
            means.append(np.stack(maps).mean(axis=0))
    else:
        means = [m.mean for m in predictor.moments(images)]
    seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in predictor.network.parameters())
    return {"mode": "held" if held else "streamed", "members": predictor.n_members, "images": n_images,
            "parameters": parameters, "peak_rss_mib": round(_peak_kib() / 1024, 1),
            "rss_before_mib": round(baseline / 1024, 1), "seconds": round(seconds, 1),
            "mean_probability": float(np.mean([m.mean() for m in means]))}  # fmt: skip


def _one(predictor, image):
    """One image through the network as loaded (no member switching): float32 [H, W]."""
    return predictor.foreground(*predictor._preprocess(image))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 30])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--base-features", type=int, default=32)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--held", action="store_true", help="also measure every member held in memory")
    parser.add_argument("--work", default="", help="folder for the ensemble (default: a temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.work, args.members[0], args.images, args.image_size, args.held)))
        return
    from mcs_batch.train.weak.synthetic_ensemble import write_random_ensemble

    with tempfile.TemporaryDirectory(prefix="refine-memory-", dir=args.work or None) as work:
        started = time.perf_counter()
        document = write_random_ensemble(work, members=max(args.members), image_size=args.image_size,
                                         base_features=args.base_features)  # fmt: skip
        size_mib = sum(p.stat().st_size for p in (Path(work) / "ensemble").glob("*.pt")) / 2**20
        print(f"ensemble: {max(args.members)} members of {document['parameters'] / 1e6:.1f} M parameters, "
              f"{size_mib:.0f} MiB on disk, written in {time.perf_counter() - started:.0f} s")  # fmt: skip
        results = []
        for held in (False, True) if args.held else (False,):
            for n in args.members:
                command = [sys.executable, __file__, "--child", "--work", work, "--members", str(n),
                           "--images", str(args.images), "--image-size", str(args.image_size)]  # fmt: skip
                done = subprocess.run(command + (["--held"] if held else []), capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"measurement failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(result)
                print(json.dumps(result))
        for mode in ("streamed", "held"):
            rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["members"])
            if len(rows) > 1:
                ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
                print(f"{mode}: peak RSS {rows[0]['members']} member(s) {rows[0]['peak_rss_mib']:.0f} MiB, "
                      f"{rows[-1]['members']} members {rows[-1]['peak_rss_mib']:.0f} MiB: x{ratio:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
