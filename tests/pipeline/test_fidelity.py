"""What the models see, through real job runs with tiny models: 8-bit greyscale as stored (equal to
its RGB twin), and NIfTI volumes in one display orientation whatever their stored layout, with masks
written back in each source's own grid."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mcs_batch.config import load_config
from mcs_batch.explain import explain
from mcs_batch.models.registry import load_models
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from tests.io.test_display import write_twins
from tests.pipeline.test_job import QUIET, job

pytestmark = pytest.mark.usefixtures("ray_local")
# Differ between two runs of one input, or name where it lives: not part of a comparison.
RUN_FIELDS = {"run_id", "committed_at", "source_uris", "mask_uri", "mask_png_uri", "load_seconds", "saliency_seconds",
              "sam_seconds"}  # fmt: skip


def results(out: Path) -> tuple[list[dict], list[dict], dict[str, np.ndarray]]:
    """Cases rows, slice rows (without run fields, in a stable order) and mask arrays by case id."""
    catalog = Catalog(str(out))
    cases = sorted(catalog.cases().to_pylist(), key=lambda r: r["case_id"])
    slices = sorted(catalog.slices().to_pylist(), key=lambda r: (r["case_id"], r["slice_index"]))
    masks = {r["case_id"]: read_mask(r["mask_uri"]) for r in cases}
    return [strip(r) for r in cases], [strip(r) for r in slices], masks


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in RUN_FIELDS}


def read_mask(uri: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(Path(uri.removeprefix("file://")).read_bytes()))


def test_a_greyscale_png_and_its_rgb_twin_give_the_same_saliency_and_masks(tmp_path: Path):
    rng = np.random.default_rng(3)
    gray = rng.integers(50, 90, (56, 72), dtype=np.uint8)
    gray[14:34, 20:44] = 170  # 50..170: a percentile stretch would change every pixel
    for name, image in (("grey", gray), ("rgb", np.repeat(gray[:, :, None], 3, axis=2))):
        (tmp_path / name / "twin").mkdir(parents=True)
        Image.fromarray(image).save(tmp_path / name / "twin" / "img.png")  # one key (twin/img.png): one case id
    assert [Image.open(tmp_path / n / "twin" / "img.png").mode for n in ("grey", "rgb")] == ["L", "RGB"]
    for name in ("grey", "rgb"):
        run_job(job([tmp_path / name / "twin"], tmp_path / f"out-{name}", tmp_path), **QUIET)
    grey_cases, grey_slices, grey_masks = results(tmp_path / "out-grey")
    rgb_cases, rgb_slices, rgb_masks = results(tmp_path / "out-rgb")
    assert [r["status"] for r in grey_cases] == ["ok"] and grey_cases == rgb_cases
    assert grey_cases[0]["mask_volume_ml"] is None and grey_cases[0]["mask_voxels"] >= 0  # pixels of no known size
    assert grey_slices == rgb_slices and len(grey_slices) == 1  # boxes, SAM score, saliency statistics
    (case_id,) = grey_masks
    np.testing.assert_array_equal(grey_masks[case_id].get_fdata(), rgb_masks[case_id].get_fdata())
    assert grey_masks[case_id].shape == (72, 56, 1)

    cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion",
                      overrides=[f"models.cache_dir={tmp_path.parent / 'model-cache'}"])  # fmt: skip
    models = load_models(cfg.models)
    for name in ("grey", "rgb"):
        explain([str(tmp_path / name / "twin")], tmp_path / f"explain-{name}", cfg, models, progress=lambda m: None)
    folder = Path(case_id) / "k0"
    grey_image = np.asarray(Image.open(tmp_path / "explain-grey" / folder / "image.png"))
    np.testing.assert_array_equal(grey_image, np.repeat(gray[:, :, None], 3, axis=2))  # as stored, no stretch
    np.testing.assert_array_equal(grey_image, np.asarray(Image.open(tmp_path / "explain-rgb" / folder / "image.png")))
    saliency = [np.load(tmp_path / f"explain-{n}" / folder / "lesion" / "saliency.npy") for n in ("grey", "rgb")]
    assert saliency[0].shape == (56, 72) and saliency[0].max() > saliency[0].min()
    np.testing.assert_array_equal(saliency[0], saliency[1])


def test_a_nifti_volume_in_any_stored_layout_gives_its_dicom_twins_mask_in_world_coordinates(tmp_path: Path):
    records = write_twins(tmp_path / "in")  # MR: every twin is windowed by the same percentiles
    # One M2IB step: the map does not depend on the noise, hence not on the case id (the seed).
    cfg = job([tmp_path / "in"], tmp_path / "out", tmp_path, "m2ib.steps=1", "resources.saliency_batch=1")
    run_job(cfg, **QUIET)
    rows = {r["case_id"]: r for r in Catalog(str(tmp_path / "out")).cases().to_pylist()}
    masks = {name: read_mask(rows[r.case_id]["mask_uri"]) for name, r in records.items()}
    assert all(rows[r.case_id]["status"] == "ok" for r in records.values())
    reference = nib.as_closest_canonical(masks["dicom"])
    voxels = int(np.asarray(reference.dataobj).sum())
    assert 0 < voxels < np.prod(reference.shape)  # something segmented, not everything
    for name, record in records.items():
        mask = masks[name]
        assert mask.shape == tuple(record.shape), name  # each in its own stored grid
        np.testing.assert_allclose(mask.affine, np.reshape(record.affine, (4, 4)), atol=1e-5, err_msg=name)
        canonical = nib.as_closest_canonical(mask)  # world coordinates, one layout for all
        np.testing.assert_allclose(canonical.affine, reference.affine, atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(np.asarray(canonical.dataobj), np.asarray(reference.dataobj), err_msg=name)
        assert rows[record.case_id]["mask_voxels"] == voxels and rows[record.case_id]["mask_volume_ml"] > 0
