"""What a worker can hold: limits on slice and volume sizes, judged from headers before any decoding.

A case too large for them fails `too_large` when its record is made (the grouper applies them to every
case as it leaves, `scan` included), instead of a decoder allocating what the worker cannot hold and
the worker being killed and retried. The limits are settings of the job (`resources.max_*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcs_batch.errors import ErrorCode
from mcs_batch.io.display import display_shape, reoriented
from mcs_batch.records import CaseKind, CaseRecord, Status, slice_axis_for


@dataclass(frozen=True)
class SizeLimits:
    max_image_pixels: int = 64_000_000  # pixels of one slice as the models see it
    max_volume_voxels: int = 512_000_000  # voxels of a case decoded whole (see loaded_whole)


def loaded_whole(record: CaseRecord, axis: int) -> bool:
    """A NIfTI file (a gzip stream), a multi-frame object (its frames decode together), a volume sliced
    along another axis than its files, or one shown in another orientation than stored is decoded
    whole; an axial DICOM series chunk by chunk."""
    return axis != 2 or record.kind in (CaseKind.NIFTI, CaseKind.DICOM_MULTIFRAME) or reoriented(record)


def check_size(record: CaseRecord, limits: SizeLimits, axis: int) -> CaseRecord:
    """The record, failed `too_large` when a slice has more than max_image_pixels pixels or a case
    decoded whole more than max_volume_voxels voxels (`axis`: the job's slice axis)."""
    if record.status != Status.OK or record.shape is None:
        return record
    axis = slice_axis_for(record, axis)
    shape = display_shape(record)
    in_plane = int(np.prod([shape[a] for a in range(3) if a != axis], dtype=np.float64))
    voxels = int(np.prod(shape, dtype=np.float64))
    message = None
    if in_plane > limits.max_image_pixels:
        message = f"slices of {in_plane:,} pixels exceed resources.max_image_pixels ({limits.max_image_pixels:,})"
    elif loaded_whole(record, axis) and voxels > limits.max_volume_voxels:
        why = {CaseKind.NIFTI: "a NIfTI file", CaseKind.DICOM_MULTIFRAME: "a multi-frame object"}.get(
            record.kind, f"slice_axis {axis}" if axis != 2 else "shown in another orientation than stored"
        )
        message = (f"a volume of {voxels:,} voxels, loaded whole ({why}), exceeds "
                   f"resources.max_volume_voxels ({limits.max_volume_voxels:,})")  # fmt: skip
    if message is None:
        return record
    record.status, record.error_code = Status.FAILED, ErrorCode.TOO_LARGE
    record.error_message = f"{record.source_uris[0] if record.source_uris else record.case_id}: {message}"
    return record
