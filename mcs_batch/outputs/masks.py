"""Mask files: NIfTI in exactly the source geometry (shape and affine), PNG for 2D images."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
from PIL import Image


def nifti_bytes(mask: np.ndarray, affine: np.ndarray, *, tiny: bool = False) -> bytes:
    """uint8 label map [I, J, K] with the source affine (sform and qform) -> .nii.gz bytes."""
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), np.asarray(affine, float))
    image.header.set_data_dtype(np.uint8)
    image.set_sform(np.asarray(affine, float), code=1)
    image.set_qform(np.asarray(affine, float), code=1)
    image.header["descrip"] = b"mcs-batch mask (TINY random models: meaningless)" if tiny else b"mcs-batch mask"
    return gzip.compress(image.to_bytes(), compresslevel=6)


def png_bytes(mask_hw: np.ndarray) -> bytes:
    """bool / uint8 [H, W] -> 8-bit PNG with 0 and 255."""
    buffer = io.BytesIO()
    Image.fromarray((np.asarray(mask_hw) > 0).astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()
