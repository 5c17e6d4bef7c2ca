"""Load any case of the manifest into a Volume (pixels + exact geometry)."""

from __future__ import annotations

import fsspec

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.dicom import load_dicom_case
from mcs_batch.io.images import load_image
from mcs_batch.io.nifti import load_nifti
from mcs_batch.io.storage import fetch_bytes
from mcs_batch.io.volume import Volume
from mcs_batch.records import CaseKind, CaseRecord, Status


def load_case(
    record: CaseRecord, *, fs: fsspec.AbstractFileSystem | None = None, slices: slice | None = None
) -> Volume:
    """Decode a case. `slices` selects a range of k (bounded memory for long volumes).

    Raises CaseError with a reason code for anything wrong with the bytes.
    """
    if record.status != Status.OK:
        raise CaseError(f"case {record.case_id} has status {record.status}", code=record.error_code or "internal_error")
    if record.kind in (CaseKind.DICOM_SERIES, CaseKind.DICOM_MULTIFRAME, CaseKind.DICOM_IMAGE):
        volume = load_dicom_case(record, fs=fs, slices=slices)
    elif record.kind == CaseKind.NIFTI:
        uri = record.source_uris[0]
        volume = load_nifti(fetch_bytes(fs, uri), uri=uri, record=record, slices=slices)
    elif record.kind == CaseKind.IMAGE:
        uri = record.source_uris[0]
        volume = load_image(fetch_bytes(fs, uri), uri=uri)
    else:
        raise CaseError(
            f"case {record.case_id}: cannot load a case of kind {record.kind}", code=ErrorCode.UNSUPPORTED_FORMAT
        )
    expected = tuple(record.shape[:2])
    if volume.shape[:2] != expected:
        raise CaseError(
            f"{record.source_uris[0]}: decoded size {volume.shape[:2]} differs from the header's {expected}",
            code=ErrorCode.DECODE_ERROR,
        )
    return volume
