"""Weak supervision on synthetic data with known truth: do refined masks beat the pseudo-labels they
were trained on?

Images (bright ellipses on texture, 64 x 64) with their truth; pseudo-labels = truth perturbed (random
dilation / erosion, shifts, dropped masks), committed as a segmentation run would commit them. Then the
real path: `train_weak` (selection, export, nnU-Net planning, a checkpoint ensemble on Ray Train) and
`refine` (the ensemble over every case -> <target>@weak). Printed: mean DSC against truth of the
pseudo-labels and of the refined masks, the ensemble's size, and the time of each step.

    .venv/bin/python bench/weak_bench.py                       # 40 images, ~5 min on 2 CPU cores
    .venv/bin/python bench/weak_bench.py --n 80 --epochs-per-cycle 12 --workers 2
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="images")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--epochs-per-cycle", type=int, default=8)
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept per cycle")
    parser.add_argument("--iterations", type=int, default=10, help="training iterations per epoch")
    parser.add_argument("--base-features", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--max-morph", type=int, default=3)
    parser.add_argument("--max-shift", type=int, default=4)
    parser.add_argument("--drop", type=float, default=0.15, help="fraction of pseudo-labels replaced by empty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.refine import refine
    from mcs_batch.train.weak.synthetic import Noise, write_pseudo_run
    from mcs_batch.train.weak.train import train_weak

    root = Path(tempfile.mkdtemp(prefix="weak-bench-"))
    out, work = root / "out", root / "work"
    noise = Noise(max_morph=args.max_morph, max_shift=args.max_shift, drop_fraction=args.drop)
    cases = write_pseudo_run(root, str(out), n=args.n, seed=args.seed, noise=noise)
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    overrides = [
        f"train.cycles={args.cycles}", f"train.epochs_per_cycle={args.epochs_per_cycle}",
        f"train.keep_per_cycle={args.keep}", f"train.iterations_per_epoch={args.iterations}",
        "train.val_iterations_per_epoch=2", f"train.base_features={args.base_features}",
        f"run.num_workers={args.workers}", f"run.cpus_per_worker={1.0 if args.workers == 1 else 0.5}",
        f"refine.threshold={args.threshold}",
    ]  # fmt: skip
    cfg = load_weak_config(source=str(out), target="lesion", work=str(work), overrides=overrides)
    started = time.perf_counter()
    ensemble = train_weak(cfg, progress=lambda m: print(f"  {m}", flush=True))
    trained = time.perf_counter()
    summary = refine(cfg, progress=lambda m: print(f"  {m}", flush=True))
    refined = time.perf_counter()

    rows = {r["case_id"]: r for r in Catalog(str(out)).cases().to_pylist() if r["target"] == cfg.refined_target}
    pseudo_dsc, refined_dsc = [], []
    for case_id, case in cases.items():
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(Path(rows[case_id]["mask_uri"][7:]).read_bytes()))
        refined_hw = np.asarray(mask.dataobj)[:, :, 0].T > 0
        pseudo_dsc.append(dice(case["pseudo"], case["truth"]))
        refined_dsc.append(dice(refined_hw, case["truth"]))
    print(f"\n{args.n} images, noise {noise}; ensemble of {len(ensemble['members'])} checkpoint(s), "
          f"{args.workers} worker(s); outputs in {root}")  # fmt: skip
    print(f"mean DSC vs truth: pseudo-labels {np.mean(pseudo_dsc):.4f}   refined (ensemble > {args.threshold}) "
          f"{np.mean(refined_dsc):.4f}")  # fmt: skip
    print(f"refined better on {sum(r > p for r, p in zip(refined_dsc, pseudo_dsc, strict=True))}/{args.n} images")
    print(f"time: train_weak {trained - started:.0f} s (selection, export, planning, training), "
          f"refine {refined - trained:.0f} s ({summary['cases']})")  # fmt: skip


if __name__ == "__main__":
    main()
