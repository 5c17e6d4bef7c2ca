"""Output building blocks: slice placement, mask packing and files, the catalog's commit protocol."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mcs_batch.io.volume import Volume
from mcs_batch.outputs.assemble import place
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.masks import nifti_bytes, pack_mask, unpack_mask


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_place_inverts_slice_image(axis: int):
    rng = np.random.default_rng(axis)
    volume = Volume(array=rng.random((5, 6, 7)).astype(np.float32), affine=np.eye(4))
    rebuilt = np.zeros((5, 6, 7), np.float32)
    for k in range(volume.shape[axis]):
        place(rebuilt, k, axis, volume.slice_image(k, axis=axis))
    np.testing.assert_array_equal(rebuilt, volume.array)


def test_mask_packing_round_trip():
    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    np.testing.assert_array_equal(unpack_mask(pack_mask(mask), (37, 53)), mask)
    assert len(pack_mask(mask)) == (37 * 53 + 7) // 8


def test_nifti_mask_keeps_shape_and_affine():
    affine = np.array([[-0.8, 0.1, 0, 10], [0, -0.8, 0.2, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:3, 2:4, 1] = 1
    img = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(mask, affine)))
    assert img.shape == (6, 5, 4) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)


def row(case_id: str, status: str = "ok") -> dict:
    return {"case_id": case_id, "target": "t", "status": status}


def test_commit_repair_and_drop_failed(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    catalog.commit("run1", 0, [row("a"), row("b", "failed")], [{"case_id": "a", "target": "t", "slice_index": 0}])
    assert catalog.committed() == {("a", "t"): "ok", ("b", "t"): "failed"}
    assert catalog.slices().num_rows == 1
    # a crash between the slices file and the cases file leaves an orphan: repair removes it
    catalog.write_bytes(catalog.path("catalog/slices/part-run2-000000.parquet"), b"partial")
    (tmp_path / "catalog" / "cases" / ".tmp-x-part-run2-000000.parquet").write_bytes(b"half written")
    removed = catalog.repair()
    assert len(removed) == 2 and catalog.slices().num_rows == 1
    assert catalog.drop_failed() == [("b", "t")]
    assert catalog.committed() == {("a", "t"): "ok"}


def test_mask_paths_use_ids_only(tmp_path: Path):
    nifti, png = Catalog(str(tmp_path)).mask_paths("0123abcd", "lungs")
    assert nifti.endswith("/masks/0123abcd/lungs.nii.gz") and png.endswith("/masks/0123abcd/lungs.png")
