"""Mask images as truth: every PNG mode, 0/1 and 0/255 masks, JPEG ringing, labels, size checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mcs_batch.eval.truth import TruthError, image_mask


def encoded(array: np.ndarray, mode: str, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt, **({"quality": 70} if fmt == "JPEG" else {}))
    return buffer.getvalue()


MASK = np.zeros((12, 16), np.uint8)
MASK[3:8, 4:11] = 255


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16"])
def test_any_png_mode_gives_the_same_mask_in_the_prediction_frame(mode):
    mask = image_mask(encoded(MASK, mode), uri="m.png", shape=(16, 12, 1))
    assert mask.shape == (16, 12, 1) and mask.dtype == bool
    np.testing.assert_array_equal(mask[:, :, 0], MASK.T > 0)  # [W, H]: i along a row


def test_zero_one_masks_jpeg_ringing_and_labels():
    ones = (MASK > 0).astype(np.uint8)
    np.testing.assert_array_equal(image_mask(encoded(ones, "L"), uri="m.png", shape=None)[:, :, 0], ones.T > 0)
    jpeg = image_mask(encoded(MASK, "L", "JPEG"), uri="m.jpg", shape=(16, 12, 1))
    assert abs(int(jpeg.sum()) - int((MASK > 0).sum())) <= 4  # ringing near 0 and 255 is not foreground
    labels = MASK // 255 + (np.arange(16)[None, :] > 12).astype(np.uint8) * 2
    assert image_mask(encoded(labels, "L"), uri="m.png", shape=None, label=2).sum() == 3 * 12
    with pytest.raises(TruthError, match="not the same image"):
        image_mask(encoded(MASK, "L"), uri="m.png", shape=(12, 16, 1))
    with pytest.raises(TruthError, match="cannot decode"):
        image_mask(b"not a png", uri="m.png", shape=None)
    with pytest.raises(TruthError, match="labels of image and NIfTI truth are numbers"):
        image_mask(encoded(MASK, "L"), uri="m.png", shape=None, label="tumour")
