"""The in-memory image type every reader returns: pixels plus exact geometry.

Conventions (the same as nibabel / NIfTI):
- `array` is indexed (i, j, k) as it would be stored in a NIfTI file: i runs along a row of a DICOM
  image (increasing column), j down a column (increasing row), k across slices.
- `affine` maps the index (i, j, k, 1) to world millimetres in RAS+ (x right->Left is negative:
  R = -LPS x, A = -LPS y, S = LPS z).
- Scalar images are float32 in physical units (HU for CT after the modality LUT; MONOCHROME1
  already inverted so that larger is brighter). Colour images are uint8 with a trailing RGB axis.
- 2D images are volumes with K == 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """An intensity image with geometry.

    array:   float32 [I, J, K] (scalar, physical units) or uint8 [I, J, K, 3] (RGB)
    affine:  float64 [4, 4], index (i, j, k) -> world mm, RAS+
    modality: DICOM modality code ("CT", "MR", "US", "CR", "DX", "MG", ...) or "" when unknown
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = ""
    meta: dict = field(default_factory=dict)  # small, non-identifying facts (no patient data)

    def __post_init__(self):
        if self.array.ndim not in (3, 4) or (self.array.ndim == 4 and self.array.shape[3] != 3):
            raise ValueError(f"Volume array must be [I, J, K] or [I, J, K, 3], got {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K), without the colour axis."""
        return tuple(int(n) for n in self.array.shape[:3])

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k: the column norms of the affine's 3x3 part."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def slice_image(self, index: int, axis: int = 2) -> np.ndarray:
        """One 2D slice as shown [H, W] (or [H, W, 3]): `plane` of the array."""
        return plane(self.array, index, axis)


def plane(array: np.ndarray, index: int, axis: int = 2) -> np.ndarray:
    """Slice `index` along `axis` of an [I, J, K] (or [I, J, K, 3]) array as an image [H, W] (or
    [H, W, 3]): H runs along the lower remaining axis. For axis 2 (axial for an axial DICOM series)
    this is exactly the stored DICOM frame: H runs along j (rows), W along i (columns)."""
    where: list = [slice(None)] * array.ndim
    where[axis] = index  # a view: np.take copies the whole (Fortran-ordered, NIfTI) volume first
    return np.swapaxes(array[tuple(where)], 0, 1)


def place(array: np.ndarray, index: int, axis: int, image_hw: np.ndarray) -> None:
    """Inverse of `plane`: put an [H, W] image back at `index` along `axis` of an [I, J, K] array."""
    where: list = [slice(None)] * 3
    where[axis] = index
    array[tuple(where)] = image_hw.T


def corners_world(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (RAS mm) of the 8 corner voxel centres: float64 [8, 3]."""
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (affine @ idx.T).T[:, :3]
