"""Mask files: NIfTI in exactly the source geometry."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

from mcs_batch.outputs.masks import nifti_bytes


def test_nifti_mask_keeps_shape_and_affine():
    affine = np.array([[-0.8, 0.1, 0, 10], [0, -0.8, 0.2, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:3, 2:4, 1] = 1
    img = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(mask, affine)))
    assert img.shape == (6, 5, 4) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
