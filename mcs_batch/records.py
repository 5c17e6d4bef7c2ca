"""Row vocabulary: the case record every stage passes along, and how case ids are made.

A case is what one segmentation result belongs to: a DICOM series (or one of its consistent parts),
a multi-frame DICOM object, a 2D DICOM image, a NIfTI file, or a PNG/JPEG image. A case record holds
no pixels and no patient-identifying data; it names its sources and its geometry.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum


class CaseKind(StrEnum):
    DICOM_SERIES = "dicom_series"  # single-frame slices with patient geometry, one volume
    DICOM_MULTIFRAME = "dicom_multiframe"  # one multi-frame object (enhanced CT/MR, cine US, ...)
    DICOM_IMAGE = "dicom_image"  # one 2D object (CR, DX, MG, US, SC, ...)
    DICOM_OTHER = "dicom_other"  # a DICOM object that is not an image (SR, RTSTRUCT, SEG, ...)
    NIFTI = "nifti"
    IMAGE = "image"  # PNG / JPEG
    UNKNOWN = "unknown"  # an object we could not identify


class Status(StrEnum):
    OK = "ok"
    SKIPPED = "skipped"  # nothing to segment here, by design (non-image object, localizer)
    FAILED = "failed"  # should have been segmentable, but is broken


SPACING_ASSUMED = "1 mm pixels assumed"  # ends the warning of a record whose pixel size is not known


def make_case_id(identity: str) -> str:
    """Deterministic case id from a stable identity string (a UID, or an object's key: its path from
    the folder above its input, see io/discover.input_key_root; never a machine-specific absolute
    path): 24 hex characters."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:24]


@dataclass
class CaseRecord:
    """One row of the case manifest. Lists are plain lists so rows travel through Arrow/Ray."""

    case_id: str
    kind: str
    source_uris: list[str]  # in slice order for DICOM series
    source_keys: list[str]  # the same objects' keys: <input folder name>/<path in the input>
    status: str = Status.OK
    error_code: str | None = None
    error_message: str | None = None
    modality: str = ""
    study_uid: str = ""
    series_uid: str = ""
    shape: list[int] | None = None  # (I, J, K) of the loaded volume
    spacing_mm: list[float] | None = None  # along i, j, k
    affine: list[float] | None = None  # 16 float64, row-major, (i, j, k) -> RAS mm
    slice_index: list[int] | None = None  # k of each source object (series) or frame (multi-frame)
    volume_index: int | None = None  # which volume of a 4D NIfTI
    transfer_syntax: str = ""
    photometric: str = ""
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0  # header bytes fetched to build this record

    @property
    def n_files(self) -> int:
        return len(self.source_uris)

    def to_row(self) -> dict:
        row = asdict(self)
        row["n_files"] = self.n_files
        return row

    @classmethod
    def from_row(cls, row: dict) -> CaseRecord:
        names = {f.name for f in fields(cls)}
        values = {}
        for k, v in row.items():
            if k not in names:
                continue
            if hasattr(v, "tolist"):  # numpy arrays from Arrow / Ray batches
                v = v.tolist()
            values[k] = v
        return cls(**values)


def instances_digest(record: CaseRecord) -> str | None:
    """The instance set of a DICOM series case (a digest of its sorted source keys), None for cases of
    one object. A series committed while its files were still arriving has another digest once
    complete, and the next run redoes it (archive/grouping.py)."""
    if record.kind != CaseKind.DICOM_SERIES or not record.source_keys:
        return None
    return hashlib.sha256("\n".join(sorted(record.source_keys)).encode("utf-8")).hexdigest()[:16]


def failed_record(identity: str, kind: str, uri: str, key: str, code: str, message: str, **extra) -> CaseRecord:
    """A failure (or skip, with status=...) row for one object."""
    status = extra.pop("status", Status.FAILED)
    return CaseRecord(
        case_id=make_case_id(identity),
        kind=kind,
        source_uris=[uri],
        source_keys=[key],
        status=status,
        error_code=str(code),
        error_message=message,
        **extra,
    )


def slice_axis_for(record: CaseRecord, axis: int) -> int:
    """The array axis a case is segmented along: `axis` (config slice_axis) for volumes, always 2
    (the one slice) for 2D images and cases without a shape."""
    return 2 if record.shape is None or record.shape[2] == 1 else axis


def spacing_known(record: CaseRecord) -> bool:
    """Whether the record's voxel size is physical: not for PNG/JPEG images, nor for DICOM objects
    without pixel spacing (their records carry a warning ending in SPACING_ASSUMED)."""
    if record.kind == CaseKind.IMAGE or record.spacing_mm is None:
        return False
    return not any(w.endswith(SPACING_ASSUMED) for w in record.warnings)
