"""Synthetic pseudo-labels with known truth, for tests and the weak-supervision benchmark.

`write_pseudo_run` writes 2D PNG images (bright ellipses on texture), and an OUT as a segmentation job
would leave it for them: masks (truth perturbed by dilation / erosion, shifts and dropped masks) and
committed catalog rows (cases and slices) through the public Catalog API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from mcs_batch.io.images import IMAGE_AFFINE
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes, png_bytes
from mcs_batch.records import make_case_id


@dataclass(frozen=True)
class Noise:
    """How truth becomes a pseudo-label."""

    max_morph: int = 2  # dilation (positive) or erosion (negative) by up to this many pixels
    max_shift: int = 3  # pixels, each axis
    drop_fraction: float = 0.0  # masks replaced by an empty one


def blob(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [H, W] image, bool [H, W] truth): one bright ellipse on a textured background."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    ry, rx = rng.uniform(0.12, 0.22, 2) * size
    mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    texture = 50 + 20 * np.sin(x / 3.0) * np.cos(y / 4.0) + rng.normal(0, 10, (size, size))
    image = np.where(mask, 190 + rng.normal(0, 12, (size, size)), texture)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def perturb(mask: np.ndarray, rng: np.random.Generator, noise: Noise) -> np.ndarray:
    if rng.uniform() < noise.drop_fraction:
        return np.zeros_like(mask)
    out = mask.copy()
    morph = int(rng.integers(-noise.max_morph, noise.max_morph + 1)) if noise.max_morph else 0
    if morph > 0:
        out = ndimage.binary_dilation(out, iterations=morph)
    elif morph < 0:
        out = ndimage.binary_erosion(out, iterations=-morph)
    if noise.max_shift:
        dy, dx = (int(v) for v in rng.integers(-noise.max_shift, noise.max_shift + 1, 2))
        out = np.roll(out, (dy, dx), axis=(0, 1))
    return out


def bbox(mask: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def pseudo_label_rows(catalog: Catalog, case_id: str, path: Path, key: str, pseudo: np.ndarray, *, target: str,
                      prompt: str, run_id: str, box: list[float] | None) -> tuple[dict, dict]:  # fmt: skip
    """The mask files of one 2D image's pseudo-label (bool [H, W]) written into the catalog's OUT, and
    the case row and slice row a segment run would commit for it (SAM's box: `box`)."""
    nifti, png = catalog.mask_paths(case_id, target)
    catalog.write_bytes(nifti, nifti_bytes(pseudo.T[:, :, None].astype(np.uint8), IMAGE_AFFINE))
    catalog.write_bytes(png, png_bytes(pseudo))
    pixels, (height, width) = int(pseudo.sum()), pseudo.shape
    row = {
        "case_id": case_id, "target": target, "prompts": [prompt], "status": "ok", "kind": "image",
        "source_uris": [path.as_uri()], "source_keys": [key], "shape": [width, height, 1],
        "spacing_mm": [1.0, 1.0, 1.0], "affine": IMAGE_AFFINE.reshape(-1).tolist(),
        "mask_uri": catalog.fs.unstrip_protocol(nifti), "mask_png_uri": catalog.fs.unstrip_protocol(png),
        "mask_voxels": pixels, "mask_volume_ml": pixels / 1000.0, "n_components": 1 if pixels else 0,
        "n_slices": 1, "n_slices_with_mask": int(pixels > 0), "sam_score_mean": 0.9 if pixels else None,
        "config_hash": "synthetic", "run_id": run_id, "tiny_models": False, "warnings": [],
    }  # fmt: skip
    slice_row = {
        "case_id": case_id, "target": target, "slice_index": 0, "boxes_xyxy": [box], "points_xy": [],
        "sam_score": 0.9 if pixels else 0.0, "mask_pixels": pixels, "run_id": run_id,
    }  # fmt: skip
    return row, slice_row


def write_pseudo_run(root: Path, out: str, *, n: int = 12, size: int = 64, target: str = "lesion", seed: int = 0,
                     noise: Noise = Noise(), folder: str = "cohort", edit_slice=None, run_id: str = "run-synthetic",
                     storage: StorageOptions | None = None) -> dict:  # fmt: skip
    """Images under root/<folder>/, truth masks under root/truth/, a committed OUT (`edit_slice(i, row)`
    may change case i's slice row before the commit: scores, boxes), committed as run `run_id` (another
    folder and run id: a later cohort added to the same OUT). Returns
    {case_id: {"key", "truth" (bool [H, W]), "pseudo" (bool [H, W])}}."""
    rng = np.random.default_rng(seed)
    catalog = Catalog(out, storage=storage)
    cases, rows, slice_rows = {}, [], []
    for i in range(n):
        image, truth = blob(rng, size)
        pseudo = perturb(truth, rng, noise)
        key = f"{folder}/img{i:03d}.png"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        (root / "truth").mkdir(parents=True, exist_ok=True)
        Image.fromarray(truth.astype(np.uint8) * 255).save(root / "truth" / f"img{i:03d}.png")
        case_id = make_case_id(f"file:{key}")
        row, slice_row = pseudo_label_rows(catalog, case_id, path, key, pseudo, target=target, prompt="a bright blob",
                                           run_id=run_id, box=bbox(truth))  # fmt: skip
        rows.append(row)
        slice_rows.append(slice_row)
        if edit_slice is not None:
            edit_slice(i, slice_rows[-1])
        cases[case_id] = {"key": key, "truth": truth, "pseudo": pseudo}
    catalog.commit(run_id, 0, rows, slice_rows)
    return cases
