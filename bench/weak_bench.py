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

    PYTHONPATH=. .venv/bin/python bench/weak_bench.py             # ~17 min on 2 busy CPU cores
    .venv/bin/python bench/weak_bench.py --train 8 --test 4 --cycles 1 --epochs-per-cycle 2 --keep 1  # smoke
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
from weak_data import Case, PseudoErrors, make_split, save_preview

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
    parser.add_argument("--train", type=int, default=60, help="training images")
    parser.add_argument("--test", type=int, default=40, help="held-out images")
    parser.add_argument("--size", type=int, default=96, help="image side, pixels")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--epochs-per-cycle", type=int, default=15)
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept per cycle")
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--base-features", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.2, help="refine.threshold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
