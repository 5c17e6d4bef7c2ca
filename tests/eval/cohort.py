"""Synthetic labelled data for the evaluation tests: images with known masks, the paper's folder
layout, and segment-run outputs written directly through the catalog (no models, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mcs_batch.io.images import IMAGE_AFFINE
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes
from mcs_batch.records import make_case_id

PIXELS_WARNING = "2D image without physical spacing: 1 mm pixels assumed"


def blob_image(rng: np.random.Generator, height: int, width: int, n_blobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [H, W] image, bool [H, W] mask): bright ellipses on a textured background."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = 40 + 20 * np.sin(x / 3.0) * np.cos(y / 5.0) + rng.normal(0, 8, (height, width))
    mask = np.zeros((height, width), bool)
    for b in range(n_blobs):
        cx = width * (0.3 + 0.4 * b / max(n_blobs - 1, 1)) if n_blobs > 1 else rng.uniform(0.35, 0.65) * width
        cy = rng.uniform(0.4, 0.6) * height
        ry, rx = rng.uniform(0.15, 0.25) * height, rng.uniform(0.1, 0.18) * width
        mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    image = np.where(mask, 215 + rng.normal(0, 10, (height, width)), texture)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_mask_png(path: Path, mask_hw: np.ndarray) -> Path:
    return save_png(path, np.asarray(mask_hw, np.uint8) * 255)


def paper_dataset(root: Path, folder: str, n: int, *, seed: int, mask_suffix: str = "", n_blobs: int = 1) -> Path:
    """DIR/<folder>/test_images/*.png and test_masks/*.png (named NAME<mask_suffix>.png)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = blob_image(rng, 40 + 4 * i, 48, n_blobs=n_blobs)
        save_png(root / folder / "test_images" / f"case{i:02d}.png", image)
        save_mask_png(root / folder / "test_masks" / f"case{i:02d}{mask_suffix}.png", mask)
    return root / folder


class FakeRun:
    """Writes a segment run's outputs (masks + committed catalog rows) for chosen predictions."""

    def __init__(self, out: Path, target: str = "lesion", input_name: str = "in"):
        self.catalog = Catalog(str(out))
        self.out, self.target, self.input_name, self.rows = out, target, input_name, []

    def image(self, rel: str, mask_hw: np.ndarray | None, *, status: str = "ok", error_code: str | None = None,
              shape_hw: tuple[int, int] = (8, 8)):  # fmt: skip
        """A 2D image case (PNG input, no pixel size) predicted as mask_hw ([H, W]; None: failed, with
        the image size shape_hw from its header)."""
        height, width = mask_hw.shape if mask_hw is not None else shape_hw
        case_id = make_case_id(f"file:{self.input_name}/{rel}")  # as a job over the input folder names it
        row = self._row(case_id, "image", [rel], [width, height, 1], IMAGE_AFFINE, status)
        row["warnings"] = [PIXELS_WARNING]
        if mask_hw is not None and status == "ok":
            self._mask(row, np.asarray(mask_hw).T[:, :, None], IMAGE_AFFINE)
        else:
            row.update(error_code=error_code or "decode_error", error_message=f"{rel}: made to fail")
        self.rows.append(row)
        return row

    def volume(self, case_id: str, keys: list[str], mask_ijk: np.ndarray, affine: np.ndarray, *,
               kind: str = "dicom_series", series_uid: str = "") -> dict:  # fmt: skip
        row = self._row(case_id, kind, keys, list(mask_ijk.shape), affine, "ok")
        row["series_uid"] = series_uid
        self._mask(row, mask_ijk, affine)
        self.rows.append(row)
        return row

    def _row(self, case_id, kind, paths, shape, affine, status) -> dict:
        """`paths`: the sources' paths in the input; keys start with the input's name, as a job's do."""
        spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0).tolist()
        keys = [f"{self.input_name}/{p}" for p in paths]
        return {
            "case_id": case_id, "target": self.target, "status": status, "kind": kind, "source_keys": keys,
            "source_uris": [f"file:///{k}" for k in keys], "shape": shape, "spacing_mm": spacing,
            "affine": np.asarray(affine, float).reshape(-1).tolist(), "config_hash": "fakehash", "run_id": "run-fake",
            "tiny_models": False, "warnings": [],
        }  # fmt: skip

    def _mask(self, row: dict, mask: np.ndarray, affine: np.ndarray) -> None:
        nifti, _ = self.catalog.mask_paths(row["case_id"], self.target)
        self.catalog.write_bytes(nifti, nifti_bytes(mask.astype(np.uint8), np.asarray(affine, float)))
        row["mask_uri"] = self.catalog.fs.unstrip_protocol(nifti)
        row["mask_voxels"] = int(np.count_nonzero(mask))

    def commit(self) -> str:
        self.catalog.commit("run-fake", 0, self.rows, [])
        return str(self.out)
