"""Slices back into a volume: placement inverts the loader's slicing, on every axis."""

from __future__ import annotations

import numpy as np
import pytest

from mcs_batch.io.volume import Volume, place


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_place_inverts_slice_image(axis: int):
    rng = np.random.default_rng(axis)
    volume = Volume(array=rng.random((5, 6, 7)).astype(np.float32), affine=np.eye(4))
    rebuilt = np.zeros((5, 6, 7), np.float32)
    for k in range(volume.shape[axis]):
        place(rebuilt, k, axis, volume.slice_image(k, axis=axis))
    np.testing.assert_array_equal(rebuilt, volume.array)
