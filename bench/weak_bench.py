"""Weak supervision on hard synthetic data with known truth: do refined masks beat SAM-like pseudo-labels
on images the ensemble never saw?

Data (bench/weak_data.py): a target defined by shape and position, next to a neighbour of the same
intensity, among other structures of that intensity, on a textured, noisy body; pseudo-labels with
systematic errors (leaks into the neighbour where the seam is faint, the thin tail missed, the lateral
boundary pulled in, a fixed fraction empty). Two splits from different seeds: training and held-out.

The product's path: both splits are committed as a segmentation run would commit them (catalog rows,
masks); `train_weak` (selection with the held-out cases excluded, export, nnU-Net planning, a
checkpoint ensemble on Ray Train) and `refine` (the ensemble over every case -> <target>@weak).
Printed, against truth, per split: the best single global threshold (chosen on the training split),
the pseudo-labels and the refined masks; on the held-out split, per-case wins and losses of refined vs
pseudo-labels and the means by kind of pseudo-label error.

Volume mode (`--volumes`): the same scene as volumes (bench/weak_data.py, [Y, X, Z] in HU, stored as
NIfTI, modality CT), SAM-like errors slice by slice; trained twice through the product's path, with
`configuration: 2d` (slices, background slices 1:1) and `3d_fullres` (whole volumes); printed per
held-out volume: DSC of the best global HU threshold, the pseudo-labels, refined 2D and refined 3D.

    PYTHONPATH=. .venv/bin/python bench/weak_bench.py             # ~17 min on 2 busy CPU cores
    .venv/bin/python bench/weak_bench.py --train 8 --test 4 --cycles 1 --epochs-per-cycle 2 --keep 1  # smoke
    PYTHONPATH=. .venv/bin/python bench/weak_bench.py --volumes   # 12 + 6 volumes 48x48x16, 2 x 10 epochs, ~4 min
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from weak_data import Case, PseudoErrors, VolumeCase, make_split, make_volume_split, save_preview

TARGET = "kidney"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def best_threshold(cases: list[Case]) -> int:
    """The global threshold t (image > t) with the best mean DSC against truth over `cases`."""
    return int(np.argmax([np.mean([dice(c.image > t, c.truth) for c in cases]) for t in range(256)]))


def commit_zero_shot(root: Path, out: str, cases: dict[str, tuple[str, Case]]) -> None:
    """{case_id: (source key, case)} -> images under root/<key> and an OUT as a segmentation job would
    leave it: the pseudo-labels as masks, committed catalog rows (cases and slices)."""
    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.train.weak.synthetic import bbox, pseudo_label_rows

    catalog = Catalog(out)
    rows, slice_rows = [], []
    for case_id, (key, case) in cases.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(case.image).save(path)
        row, slice_row = pseudo_label_rows(catalog, case_id, path, key, case.pseudo, target=TARGET,
                                           prompt="the left kidney", run_id="run-synthetic",
                                           box=bbox(case.pseudo))  # fmt: skip
        rows.append(row)
        slice_rows.append(slice_row)
    catalog.commit("run-synthetic", 0, rows, slice_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", action="store_true", help="volumes, trained in 2d and in 3d_fullres")
    parser.add_argument("--train", type=int, help="training images (60) or volumes (12)")
    parser.add_argument("--test", type=int, help="held-out images (40) or volumes (6)")
    parser.add_argument("--size", type=int, help="image side, pixels (96; volumes 48)")
    parser.add_argument("--depth", type=int, default=16, help="volumes: slices")
    parser.add_argument("--cycles", type=int, help="3 (volumes 2)")
    parser.add_argument("--epochs-per-cycle", type=int, help="15 (volumes 10)")
    parser.add_argument("--keep", type=int, help="checkpoints kept per cycle: 3 (volumes 2)")
    parser.add_argument("--iterations", type=int, help="training iterations per epoch: 25 (volumes 25)")
    parser.add_argument("--base-features", type=int, help="16 (volumes 8)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.2, help="refine.threshold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    defaults = (dict(train=12, test=6, size=48, cycles=2, epochs_per_cycle=10, keep=2, iterations=25, base_features=8)
                if args.volumes else
                dict(train=60, test=40, size=96, cycles=3, epochs_per_cycle=15, keep=3, iterations=25,
                     base_features=16))  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.volumes:
        run_volumes(args)
        return

    import ray

    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.records import make_case_id
    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.refine import refine
    from mcs_batch.train.weak.train import train_weak

    started = time.perf_counter()
    errors = PseudoErrors()
    splits = {"train": make_split(args.seed, args.train, size=args.size, errors=errors),
              "test": make_split(args.seed + 1, args.test, size=args.size, errors=errors)}  # fmt: skip
    keys = {split: [f"cohort/{split}{i:03d}.png" for i in range(len(cases))] for split, cases in splits.items()}
    ids = {split: [make_case_id(f"file:{key}") for key in keys[split]] for split in splits}
    by_id = {case_id: case for split in splits for case_id, case in zip(ids[split], splits[split], strict=True)}
    root = Path(tempfile.mkdtemp(prefix="weak-bench-"))
    out, work = root / "out", root / "work"
    commit_zero_shot(root, str(out), {case_id: (key, by_id[case_id]) for split in splits
                                      for case_id, key in zip(ids[split], keys[split], strict=True)})  # fmt: skip
    save_preview(splits["test"], root / "preview.png")
    t = best_threshold(splits["train"])

    ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    overrides = [
        f"select.exclude={json.dumps(ids['test'])}",  # the held-out split is never a pseudo-label
        f"train.cycles={args.cycles}", f"train.epochs_per_cycle={args.epochs_per_cycle}",
        f"train.keep_per_cycle={args.keep}", f"train.iterations_per_epoch={args.iterations}",
        "train.val_iterations_per_epoch=2", f"train.base_features={args.base_features}",
        f"run.num_workers={args.workers}", f"run.cpus_per_worker={1.0 if args.workers == 1 else 0.5}",
        f"refine.threshold={args.threshold}",
    ]  # fmt: skip
    cfg = load_weak_config(source=str(out), target=TARGET, work=str(work), overrides=overrides)
    prepared = time.perf_counter()
    ensemble = train_weak(cfg, progress=lambda m: print(f"  {m}", flush=True))
    trained = time.perf_counter()
    summary = refine(cfg, progress=lambda m: print(f"  {m}", flush=True))
    refined_at = time.perf_counter()
    selection = json.loads((work / "selection.json").read_text())["cases"]
    history = json.loads((work / "ensemble" / "ensemble.json").read_text())["training"]["history"]

    rows = {r["case_id"]: r for r in Catalog(str(out)).cases().to_pylist() if r["target"] == cfg.refined_target}
    scores: dict[str, dict[str, list[float]]] = {}
    for split in splits:
        s = scores[split] = {"threshold": [], "pseudo": [], "refined": [], "error": []}
        for case_id in ids[split]:
            case = by_id[case_id]
            mask = nib.Nifti1Image.from_bytes(gzip.decompress(Path(rows[case_id]["mask_uri"][7:]).read_bytes()))
            s["threshold"].append(dice(case.image > t, case.truth))
            s["pseudo"].append(dice(case.pseudo, case.truth))
            s["refined"].append(dice(np.asarray(mask.dataobj)[:, :, 0].T > 0, case.truth))
            s["error"].append(case.error)

    kinds_all = ("empty", "leak", "bias")

    def mean_of(values: list[float], kinds: list[str], kind: str) -> str:
        picked = [v for v, k in zip(values, kinds, strict=True) if k == kind]
        return f"{np.mean(picked):.3f}" if picked else "-"

    test, train = scores["test"], scores["train"]
    kinds = test["error"]
    print(f"\n{args.train} training + {args.test} held-out images {args.size}x{args.size}, seed {args.seed}; "
          f"selection kept {selection.get('selected')} (dropped {selection.get('dropped')}); ensemble of "
          f"{len(ensemble['members'])} checkpoint(s), {args.cycles}x{args.epochs_per_cycle} epochs of "
          f"{args.iterations} iterations, base features {args.base_features}; outputs in {root}")  # fmt: skip
    print(f"pseudo-label errors: {errors}")
    first, last = history[0], history[-1]
    print(f"loss of the member in ensemble.json (nnU-Net's Dice + CE on pseudo-labels), first -> last epoch: train "
          f"{first['train_loss']:.3f} -> {last['train_loss']:.3f}, validation {first['val_loss']:.3f} -> "
          f"{last['val_loss']:.3f}")  # fmt: skip
    header = " ".join(f"{f'{k} ({kinds.count(k)})':>10}" for k in kinds_all)
    print(f"\nDSC vs truth, mean{'':<25} held-out ({args.test})  {header}  training ({args.train})")
    print(f"{'':<43} {'':<14} held-out, by pseudo-label error")
    for name, label in (("threshold", f"threshold image > {t} (best on training)"), ("pseudo", "pseudo-labels"),
                        ("refined", f"refined (2D ensemble > {args.threshold})")):  # fmt: skip
        by_kind = " ".join(f"{mean_of(test[name], kinds, k):>10}" for k in kinds_all)
        print(f"  {label:<41} {np.mean(test[name]):<14.3f} {by_kind}  {np.mean(train[name]):.3f}")
    diff = np.array(test["refined"]) - np.array(test["pseudo"])
    for kind in (None, *kinds_all):
        d = diff if kind is None else diff[np.array(kinds) == kind]
        if d.size:
            print(f"  refined - pseudo-labels on held-out {kind or 'all':>5}: mean {d.mean():+.3f}, better on "
                  f"{(d > 0).sum()}, worse on {(d < 0).sum()}, equal on {(d == 0).sum()} of {d.size}")  # fmt: skip
    print(f"time: data {prepared - started:.0f} s, train_weak {trained - prepared:.0f} s (selection, export, "
          f"planning, training), refine {refined_at - trained:.0f} s ({summary['cases']}), total "
          f"{refined_at - started:.0f} s")  # fmt: skip


def commit_volumes(root: Path, out: str, cases: list[VolumeCase]) -> list[str]:
    """NIfTI volumes (stored [X, Y, Z], L P S at 0.8 x 0.8 x 2.0 mm) and an OUT with their pseudo-labels
    committed as a segmentation job would (case and slice rows, modality CT); returns the case ids."""
    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.outputs.masks import nifti_bytes
    from mcs_batch.scan import discover_cases

    catalog = Catalog(out)
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    ids, rows, slices = [], [], []
    for v, case in enumerate(cases):
        path = root / "cohort" / f"vol{v:03d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(case.image.transpose(1, 0, 2), affine), path)
        (record,) = discover_cases([str(path)])
        mask = case.pseudo.transpose(1, 0, 2).astype(np.uint8)
        nifti_path, _ = catalog.mask_paths(record.case_id, TARGET)
        catalog.write_bytes(nifti_path, nifti_bytes(mask, np.reshape(record.affine, (4, 4))))
        rows.append({"case_id": record.case_id, "target": TARGET, "status": "ok", "kind": record.kind,
                     "source_uris": record.source_uris, "source_keys": record.source_keys, "modality": "CT",
                     "shape": record.shape, "spacing_mm": record.spacing_mm, "affine": record.affine,
                     "mask_uri": catalog.fs.unstrip_protocol(nifti_path), "mask_voxels": int(mask.sum()),
                     "n_components": 1 if mask.any() else 0, "run_id": "run-synthetic"})  # fmt: skip
        for k in range(mask.shape[2]):
            plane = case.pseudo[:, :, k]
            box = bbox(plane) if plane.any() else None
            slices.append({"case_id": record.case_id, "target": TARGET, "slice_index": k,
                           "sam_score": 0.9 if box else 0.0, "boxes_xyxy": [box] if box else [],
                           "mask_pixels": int(plane.sum()), "run_id": "run-synthetic"})  # fmt: skip
        ids.append(record.case_id)
    catalog.commit("run-synthetic", 0, rows, slices)
    return ids


def bbox(plane: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(plane)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def run_volumes(args) -> None:
    """The volume mode (module docstring)."""
    import shutil

    import ray

    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.outputs.reader import read_mask
    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.refine import refine
    from mcs_batch.train.weak.train import train_weak

    started = time.perf_counter()
    errors = PseudoErrors()
    train_cases = make_volume_split(args.seed, args.train, size=args.size, depth=args.depth, errors=errors)
    test_cases = make_volume_split(args.seed + 1, args.test, size=args.size, depth=args.depth, errors=errors)
    root = Path(tempfile.mkdtemp(prefix="weak-bench-volumes-"))
    base = str(root / "out")
    ids = commit_volumes(root, base, train_cases + test_cases)
    held_out = ids[args.train :]
    grid = np.arange(-100, 200, 2)  # HU
    t = int(grid[np.argmax([np.mean([dice(c.image > g, c.truth) for c in train_cases]) for g in grid])])
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    common = [
        f"select.exclude={json.dumps(held_out)}", f"train.cycles={args.cycles}",
        f"train.epochs_per_cycle={args.epochs_per_cycle}", f"train.keep_per_cycle={args.keep}",
        f"train.iterations_per_epoch={args.iterations}", "train.val_iterations_per_epoch=2",
        f"train.base_features={args.base_features}", f"run.num_workers={args.workers}",
        f"run.cpus_per_worker={1.0 if args.workers == 1 else 0.5}", f"refine.threshold={args.threshold}",
    ]  # fmt: skip
    prepared = time.perf_counter()
    refined, seconds, members = {}, {}, {}
    for configuration in ("2d", "3d_fullres"):
        out, work = str(root / f"out-{configuration}"), str(root / f"work-{configuration}")
        shutil.copytree(base, out)
        at = time.perf_counter()
        overrides = [*common, f"configuration={configuration}"]
        cfg = load_weak_config(source=base, target=TARGET, work=work, overrides=overrides)
        ensemble = train_weak(cfg, progress=lambda m: print(f"  {m}", flush=True))
        members[configuration] = len(ensemble["members"])
        cfg = load_weak_config(source=out, target=TARGET, work=work, overrides=overrides)
        refine(cfg, case_ids=held_out, progress=lambda m: print(f"  {m}", flush=True))
        seconds[configuration] = time.perf_counter() - at
        rows = {r["case_id"]: r for r in Catalog(out).cases().to_pylist() if r["target"] == cfg.refined_target}
        refined[configuration] = [read_mask(rows[c]["mask_uri"], None).transpose(1, 0, 2) > 0 for c in held_out]

    columns = {"threshold": [dice(c.image > t, c.truth) for c in test_cases],
               "pseudo": [dice(c.pseudo, c.truth) for c in test_cases],
               "2d": [dice(m, c.truth) for m, c in zip(refined["2d"], test_cases, strict=True)],
               "3d": [dice(m, c.truth) for m, c in zip(refined["3d_fullres"], test_cases, strict=True)]}  # fmt: skip
    print(f"\n{args.train} training + {args.test} held-out volumes {args.size}x{args.size}x{args.depth} (HU, CT), "
          f"seed {args.seed}; ensembles of {members['2d']} (2d) and {members['3d_fullres']} (3d_fullres) "
          f"checkpoints, {args.cycles}x{args.epochs_per_cycle} epochs of {args.iterations} iterations, base "
          f"features {args.base_features}; outputs in {root}")  # fmt: skip
    print(f"pseudo-label errors (slice by slice): {errors}")
    print(f"\nDSC vs truth per held-out volume   {'error':>6} {'threshold':>10} {'pseudo':>8} {'2d':>8} {'3d':>8}")
    widths = (("threshold", 10), ("pseudo", 8), ("2d", 8), ("3d", 8))
    for i, case in enumerate(test_cases):
        print(f"  volume {i:<26} {case.error:>6} " + " ".join(f"{columns[k][i]:>{w}.3f}" for k, w in widths))
    print(f"  {'mean':<33} {'':>6} " + " ".join(f"{np.mean(columns[k]):>{w}.3f}" for k, w in widths))
    print(f"threshold: image > {t} HU (best on the training volumes)")
    for a, b in (("2d", "pseudo"), ("3d", "pseudo"), ("3d", "2d")):
        d = np.array(columns[a]) - np.array(columns[b])
        print(f"  refined {a} - {b}: mean {d.mean():+.3f}, better on {(d > 0).sum()}, worse on {(d < 0).sum()} "
              f"of {d.size}")  # fmt: skip
    print(f"time: data {prepared - started:.0f} s, 2d train + refine {seconds['2d']:.0f} s, 3d_fullres "
          f"{seconds['3d_fullres']:.0f} s, total {time.perf_counter() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
