"""Zero-shot results written as the job would commit them, for the weak-supervision tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes
from mcs_batch.scan import discover_cases
from mcs_batch.testdata.series import write_series


def add_series_case(catalog: Catalog, folder: Path) -> dict:
    """A DICOM series (20 x 24 x 4, CT) with a zero-shot mask on slices 1 and 2 (display
    frame: x = i in 5..12, y = j in 6..15), committed as the job would
    commit it (one slice row per slice)."""
    write_series(folder, rows=24, cols=20, n_slices=4, series_seed="weak")
    (record,) = [r for r in discover_cases([str(folder)]) if r.kind == "dicom_series"]
    mask = np.zeros(tuple(record.shape), np.uint8)
    mask[5:12, 6:15, 1:3] = 1
    nifti_path, _ = catalog.mask_paths(record.case_id, "lesion")
    catalog.write_bytes(nifti_path, nifti_bytes(mask, np.reshape(record.affine, (4, 4))))
    row = {"case_id": record.case_id, "target": "lesion", "status": "ok", "kind": record.kind,
           "source_uris": record.source_uris, "source_keys": record.source_keys, "modality": record.modality,
           "shape": record.shape, "spacing_mm": record.spacing_mm, "affine": record.affine,
           "mask_uri": catalog.fs.unstrip_protocol(nifti_path), "mask_voxels": int(mask.sum()),
           "n_components": 1, "run_id": "run-series"}  # fmt: skip
    slices = [{"case_id": record.case_id, "target": "lesion", "slice_index": k, "sam_score": 0.9,
               "boxes_xyxy": [[5.0, 6.0, 12.0, 15.0]] if k in (1, 2) else [], "mask_pixels": int(mask[:, :, k].sum()),
               "run_id": "run-series"} for k in range(4)]  # fmt: skip
    catalog.commit("run-series", 0, [row], slices)
    return row


def add_nifti_case(catalog: Catalog, folder: Path) -> tuple[dict, np.ndarray]:
    """A NIfTI volume stored R, A, S (20 x 24 x 4, a bright block off centre) with a zero-shot mask on
    that block in slices 1 and 2, committed as the job would commit it; returns the row and the
    stored-grid mask."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.zeros((20, 24, 4), np.float32)
    volume[2:8, 3:14, :] = 500.0
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), folder / "ras.nii.gz")
    (record,) = discover_cases([str(folder)])
    mask = np.zeros(volume.shape, np.uint8)
    mask[2:8, 3:14, 1:3] = 1
    nifti_path, _ = catalog.mask_paths(record.case_id, "lesion")
    catalog.write_bytes(nifti_path, nifti_bytes(mask, np.reshape(record.affine, (4, 4))))
    row = {"case_id": record.case_id, "target": "lesion", "status": "ok", "kind": record.kind,
           "source_uris": record.source_uris, "source_keys": record.source_keys, "modality": record.modality,
           "shape": record.shape, "spacing_mm": record.spacing_mm, "affine": record.affine,
           "mask_uri": catalog.fs.unstrip_protocol(nifti_path), "mask_voxels": int(mask.sum()),
           "n_components": 1, "run_id": "run-nifti"}  # fmt: skip
    # display grid (L, P, S): i and j reversed, so the block's box is x in 12..18, y in 10..21
    slices = [{"case_id": record.case_id, "target": "lesion", "slice_index": k, "sam_score": 0.9,
               "boxes_xyxy": [[12.0, 10.0, 18.0, 21.0]] if k in (1, 2) else [], "mask_pixels": int(mask[:, :, k].sum()),
               "run_id": "run-nifti"} for k in range(4)]  # fmt: skip
    catalog.commit("run-nifti", 0, [row], slices)
    return row, mask
