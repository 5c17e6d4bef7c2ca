"""Background in 2d training: false positives on slices without a target, with and without empty slices.

A volume cohort (NIfTI, CT-like values) where the target (a bright ellipsoid on a few slices) has a
same-intensity distractor (a bright bar) on other slices of the same volume: intensity alone segments
both. Pseudo-labels are the truth (this bench is about background, not label noise). Training in 2d on
some volumes; the others are held out. Three variants, all refined with the same 2d pipeline:

    labelled only, refine every slice     select.empty_slice_ratio=0, refine.slices=all (the old default)
    labelled only, refine labelled slices select.empty_slice_ratio=0, refine.slices=auto (-> labelled)
    background 1:1, refine every slice    select.empty_slice_ratio=1, refine.slices=auto (-> all)

Printed per variant, on the held-out volumes: false-positive voxels on slices without the target
(the distractor's slices among them), and Dice on the slices with it.

    python bench/background_bench.py [--volumes 8] [--held-out 3] [--epochs 8] [--iterations 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes
from mcs_batch.outputs.reader import read_mask
from mcs_batch.scan import discover_cases

SHAPE = (48, 48, 16)  # i, j, k; the target on k in 3..7, the distractor on k in 9..13


def volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [I, J, K] in HU, bool truth): textured soft tissue, a 250 HU ellipsoid (the target)
    and a 250 HU bar on other slices (not the target)."""
    i, j, k = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]].astype(np.float32)
    tissue = 40 + 25 * np.sin(i / 3.0) * np.cos(j / 4.0) + rng.normal(0, 12, SHAPE)
    ci, cj = rng.uniform(16, 32, 2)
    target = ((i - ci) / 7) ** 2 + ((j - cj) / 6) ** 2 + ((k - 5) / 2.6) ** 2 <= 1
    bi = int(rng.integers(8, 36))
    bar = (np.abs(i - bi - 2) <= 2) & (j >= 8) & (j <= 40) & (k >= 9) & (k <= 13)
    hu = np.where(target | bar, 250 + rng.normal(0, 12, SHAPE), tissue).astype(np.float32)
    return hu, target


def write_cohort(folder: Path, out: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """NIfTI volumes and an OUT with their truth as committed zero-shot masks; case id -> truth."""
    rng = np.random.default_rng(seed)
    catalog = Catalog(out)
    truth, rows, slices = {}, [], []
    for v in range(n):
        hu, target = volume(rng)
        path = folder / f"vol{v:02d}.nii.gz"
        nib.save(nib.Nifti1Image(hu, np.diag([-0.8, -0.8, 2.0, 1.0])), path)  # stored L, P, S
        (record,) = discover_cases([str(path)])
        mask = target.astype(np.uint8)
        nifti_path, _ = catalog.mask_paths(record.case_id, "lesion")
        catalog.write_bytes(nifti_path, nifti_bytes(mask, np.reshape(record.affine, (4, 4))))
        rows.append({"case_id": record.case_id, "target": "lesion", "status": "ok", "kind": record.kind,
                     "source_uris": record.source_uris, "source_keys": record.source_keys, "modality": "CT",
                     "shape": record.shape, "spacing_mm": record.spacing_mm, "affine": record.affine,
                     "mask_uri": catalog.fs.unstrip_protocol(nifti_path), "mask_voxels": int(mask.sum()),
                     "n_components": 1, "run_id": "run-bench"})  # fmt: skip
        for k in range(SHAPE[2]):
            plane = mask[:, :, k].T
            ys, xs = np.nonzero(plane)
            box = [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]] if ys.size else []
            slices.append({"case_id": record.case_id, "target": "lesion", "slice_index": k, "sam_score": 0.9,
                           "boxes_xyxy": box, "mask_pixels": int(plane.sum()), "run_id": "run-bench"})  # fmt: skip
        truth[record.case_id] = target
    catalog.commit("run-bench", 0, rows, slices)
    return truth


def score(out: str, truth: dict[str, np.ndarray], held_out: list[str]) -> dict:
    refined = {r["case_id"]: r for r in Catalog(out).cases().to_pylist() if r["target"] == "lesion@weak"}
    fp_empty, dice = [], []
    for case_id in held_out:
        mask = read_mask(refined[case_id]["mask_uri"], None) > 0
        t = truth[case_id]
        empty = ~t.any(axis=(0, 1))
        fp_empty.append(int(mask[:, :, empty].sum()))
        m, tt = mask[:, :, ~empty], t[:, :, ~empty]
        dice.append(2 * (m & tt).sum() / max(m.sum() + tt.sum(), 1))
    return {"fp_voxels_on_empty_slices": int(np.sum(fp_empty)), "per_case_fp": fp_empty,
            "dice_on_target_slices": round(float(np.mean(dice)), 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.refine import refine
    from mcs_batch.train.weak.train import train_weak

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    root = Path(tempfile.mkdtemp(prefix="background-bench-"))
    try:
        (root / "in").mkdir()
        base = str(root / "out")
        truth = write_cohort(root / "in", base, args.volumes, args.seed)
        ids = sorted(truth)
        held_out = ids[: args.held_out]
        train = [
            "configuration=2d", f"select.exclude=[{','.join(held_out)}]", "train.cycles=1",
            f"train.epochs_per_cycle={args.epochs}", "train.keep_per_cycle=2",
            f"train.iterations_per_epoch={args.iterations}", "train.val_iterations_per_epoch=2",
            "train.base_features=8", "run.cpus_per_worker=1", f"train.seed={args.seed}",
        ]  # fmt: skip
        variants = [("labelled only, refine every slice", 0.0, "all"),
                    ("labelled only, refine labelled slices", 0.0, "auto"),
                    ("background 1:1, refine every slice", 1.0, "auto")]  # fmt: skip
        results = []
        for name, ratio, slices in variants:
            out = str(root / f"out-{len(results)}")
            shutil.copytree(base, out)
            work = str(root / f"work-{ratio}")
            cfg = load_weak_config(source=base, target="lesion", work=work,
                                   overrides=[*train, f"select.empty_slice_ratio={ratio}"])  # fmt: skip
            started = time.perf_counter()
            train_weak(cfg, progress=lambda m: None)  # trained once per ratio, reused after
            trained = time.perf_counter() - started
            refine_cfg = load_weak_config(source=out, target="lesion", work=work,
                                          overrides=[*train, f"select.empty_slice_ratio={ratio}",
                                                     f"refine.slices={slices}"])  # fmt: skip
            summary = refine(refine_cfg, case_ids=held_out, progress=lambda m: None)
            images = json.loads((Path(work) / "selection.json").read_text())["export"]["images"]
            results.append({"variant": name, "images_trained": images, "slices": summary["slices"],
                            "train_s": round(trained, 1), **score(out, truth, held_out)})  # fmt: skip
        print(f"{len(ids) - len(held_out)} training volumes, {len(held_out)} held out, {SHAPE} voxels, "
              f"{args.epochs} epochs x {args.iterations} iterations")  # fmt: skip
        print(f"{'variant':40s} {'refine':16s} {'FP voxels on empty slices':>26s} {'Dice on target slices':>22s}")
        for r in results:
            print(f"{r['variant']:40s} {r['slices']:16s} {r['fp_voxels_on_empty_slices']:>26d} "
                  f"{r['dice_on_target_slices']:>22.3f}   per case FP {r['per_case_fp']}, train {r['train_s']} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
