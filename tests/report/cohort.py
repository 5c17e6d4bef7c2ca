"""A segment run's OUT written directly (no models, no Ray) over real source files: PNGs, a DICOM
series and a NIfTI stored RAS (not the display orientation). Records come from the real discovery;
masks are thresholds of the real decoded images, in the stored grid, as a job writes them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from mcs_batch.io.load import load_case
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.assemble import mask_volume_ml
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes
from mcs_batch.outputs.schema import CASES_SCHEMA
from mcs_batch.scan import discover_cases
from mcs_batch.testdata.series import write_series

TARGET = "lesion"


def write_inputs(folder: Path) -> Path:
    """folder/in: 5 PNGs (different sizes, a bright block each), a 6-slice CT series, a NIfTI (RAS)."""
    src = folder / "in"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        image = rng.integers(0, 40, (40 + 8 * i, 64), dtype=np.uint8)
        image[10:26, 12 + 4 * i : 30 + 4 * i] = 230
        Image.fromarray(image).save(src / f"img{i:02d}.png")
    write_series(src / "ct", rows=32, cols=24, n_slices=6, series_seed="report")
    volume = rng.normal(100, 5, (20, 16, 8)).astype(np.float32)  # [I, J, K] stored R, A, S
    volume[2:8, 10:15, 3:7] = 900  # an asymmetric block: a flip in one frame only would miss it
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), src / "vol.nii.gz")
    return src


def write_run(src: Path, out: str, *, storage: StorageOptions | None = None) -> dict[str, dict]:
    """Commit one row per case (target TARGET) plus failures, a skip and a refined target with
    uncertainty. Returns case key -> the committed row. img00's mask is empty, img04's tiny, and
    vol.nii.gz has the lowest SAM score; rows of the images are marked as made by tiny models."""
    catalog = Catalog(out, storage=storage)
    rows: dict[str, dict] = {}
    scores = iter(np.linspace(0.9, 0.5, 20))
    for record in discover_cases([str(src)]):
        key = record.source_keys[0].split("/")[1]  # img00.png, ct, vol.nii.gz
        array = load_case(record).array
        mask = (array > (500 if record.kind != "image" else 128)).astype(np.uint8)
        if key == "img00.png":
            mask[:] = 0
        if key == "img04.png":
            mask[:] = 0
            mask[20, 20, 0] = 1
        row = {k: v for k, v in record.to_row().items() if k in CASES_SCHEMA.names}
        nifti, _ = catalog.mask_paths(record.case_id, TARGET)
        catalog.write_bytes(nifti, nifti_bytes(mask, np.reshape(record.affine, (4, 4))))
        voxels = int(mask.sum())
        row.update(target=TARGET, prompts=["a bright lesion"], status="ok", mask_uri=catalog.fs.unstrip_protocol(nifti),
                   mask_voxels=voxels, mask_volume_ml=mask_volume_ml(record, voxels), run_id="run-a",
                   sam_score_mean=0.1 if key == "vol.nii.gz" else float(next(scores)), saliency_mean=0.2,
                   saliency_max=0.8, tiny_models=record.kind == "image", config_hash="h")  # fmt: skip
        rows[key] = row
    weak = dict(rows["vol.nii.gz"], target=f"{TARGET}@weak", uncertainty=0.3, run_id="run-weak", sam_score_mean=None)
    failed = [
        {"case_id": f"f{i:023d}", "target": TARGET, "status": "failed", "kind": "image", "error_code": "decode_error",
         "error_message": f"file:///in/broken{i}.png: truncated", "source_keys": [f"in/broken{i}.png"]}
        for i in range(2)
    ]  # fmt: skip
    failed.append({"case_id": "s" * 24, "target": TARGET, "status": "skipped", "kind": "dicom",
                   "error_code": "not_an_image", "error_message": "in/rt.dcm: RTSTRUCT",
                   "source_keys": ["in/rt.dcm"]})  # fmt: skip
    catalog.commit("run-a", 0, [*rows.values(), weak, *failed], [])
    rows["vol.nii.gz@weak"] = weak
    return rows
