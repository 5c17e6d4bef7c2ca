"""The display orientation: how a case's voxels are laid out when its slices reach the models.

Volumes (K > 1: NIfTI files, DICOM series and multi-frame objects) are reoriented to the closest L, P,
S axes (nibabel's axis codes: i runs towards the patient's left, j towards posterior, k towards
superior), the layout of a standard axial DICOM series, which is therefore shown as stored (and read
chunk by chunk). Slice axis 2 is then axial, 1 coronal, 0 sagittal, and an axial slice as shown
(`volume.plane`: H along j, W along i) is the radiological view: the patient's right on the image's
left, anterior at the top. So a volume stored RAS, LPS or with permuted axes, a sagittal or a
feet-first DICOM acquisition and its NIfTI twin give the models the same images. 2D images (K = 1)
are shown as they are.

Records keep the stored shape and affine, and masks are written in the stored grid: whatever is built
in the display grid goes back through `to_stored` before it is written.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from mcs_batch.io.volume import Volume
from mcs_batch.records import CaseKind, CaseRecord, slice_axis_for

DISPLAY_AXCODES = ("L", "P", "S")
_DISPLAY_ORNT = axcodes2ornt(DISPLAY_AXCODES)


VOLUME_KINDS = (CaseKind.NIFTI, CaseKind.DICOM_SERIES, CaseKind.DICOM_MULTIFRAME)


def _stored_ornt(record: CaseRecord) -> np.ndarray | None:
    """nibabel orientation of the stored axes, or None when the case is shown as stored."""
    if record.kind not in VOLUME_KINDS or record.shape is None or record.shape[2] == 1 or record.affine is None:
        return None
    stored = io_orientation(np.asarray(record.affine, float).reshape(4, 4))
    return None if np.array_equal(stored, _DISPLAY_ORNT) else stored


def reoriented(record: CaseRecord) -> bool:
    """Whether the case's display grid differs from its stored one (then it is loaded whole)."""
    return _stored_ornt(record) is not None


def display_shape(record: CaseRecord) -> tuple[int, int, int]:
    """(I, J, K) of the case in the display orientation."""
    shape = tuple(int(n) for n in record.shape)
    stored = _stored_ornt(record)
    if stored is None:
        return shape
    out = [0, 0, 0]
    for n, (axis, _) in zip(shape, ornt_transform(stored, _DISPLAY_ORNT), strict=True):
        out[int(axis)] = n
    return tuple(out)


def slice_count(record: CaseRecord, axis: int) -> int:
    """Slices of the case along the configured slice axis, in the display orientation."""
    return display_shape(record)[slice_axis_for(record, axis)]


def to_display(array: np.ndarray, record: CaseRecord) -> np.ndarray:
    """A stored-grid [I, J, K] (or [I, J, K, 3]) array in the display orientation (a view)."""
    stored = _stored_ornt(record)
    return array if stored is None else apply_orientation(array, ornt_transform(stored, _DISPLAY_ORNT))


def to_stored(array: np.ndarray, record: CaseRecord) -> np.ndarray:
    """Inverse of `to_display`: a display-grid array back in the record's stored grid (a view)."""
    stored = _stored_ornt(record)
    return array if stored is None else apply_orientation(array, ornt_transform(_DISPLAY_ORNT, stored))


def volume_in_display(volume: Volume, record: CaseRecord) -> Volume:
    """A whole stored volume of the case in the display orientation, its affine following the axes."""
    stored = _stored_ornt(record)
    if stored is None:
        return volume
    transform = ornt_transform(stored, _DISPLAY_ORNT)
    affine = volume.affine @ inv_ornt_aff(transform, volume.shape)
    return Volume(array=apply_orientation(volume.array, transform), affine=affine, modality=volume.modality,
                  meta=volume.meta)  # fmt: skip
