"""DICOM SEG of a mask: a binary Segmentation (highdicom) that references the case's source objects.

One SEG per (DICOM case, target), one segment (the target) in it:
- a series of single-frame slices: one SEG frame per source instance, in source_uris order, with the
  instance's SOP instance UID in its derivation (source image) reference and its plane position;
- a multi-frame object: one SEG frame per source frame (frame n shows mask slice slice_index[n]);
  only objects whose frames carry patient positions (a volume), others are refused with SegRefused;
- a 2D DICOM image: one frame. Without a frame of reference (CR, DX, US, ...) the SEG has no plane
  position or orientation, so its General Image module needs Patient Orientation (Type 2C): the
  source's own value (same pixel grid), or empty (unknown) when the source has none that is usable.

The mask arrives as the NIfTI mask does: uint8 [I, J, K] in the source's stored grid (i along a DICOM
row, j down a column, k = slice order), so SEG frame n is `mask[:, :, k_n].T` ([rows, columns]).
Slice positions between source slices (gaps that io/geometry.layout_slices fills) have no source
instance and no frame. An all-empty mask is written with every frame present and empty (highdicom
cannot omit every frame); otherwise empty frames are omitted, as usual for SEG.

The SEG takes the patient and study modules from its sources (highdicom copies them): it must
reference the patient. Nothing read here leaves this module except inside the SEG: warnings from
highdicom and pydicom (which can quote header values) are swallowed, and `safe_reason` removes
patient attribute values from error messages before they reach a catalog row.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from mcs_batch.config import Code, SegmentCodes
from mcs_batch.io import dicomweb
from mcs_batch.io.storage import StorageOptions, filesystem_for, protocol_of
from mcs_batch.records import CaseKind, CaseRecord

SEG_KINDS = (CaseKind.DICOM_SERIES, CaseKind.DICOM_MULTIFRAME, CaseKind.DICOM_IMAGE)
SEG_SERIES_NUMBER = 9000  # series number of every SEG this writes (one SEG series per case and run)
MANUFACTURER = "mcs-batch"
# Header attributes whose values must never leave the SEG (error messages are scrubbed of them).
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientMotherBirthName", "PatientTelephoneNumbers", "IssuerOfPatientID",
    "ReferringPhysicianName", "AccessionNumber", "InstitutionName",
)  # fmt: skip


# Type 2 attributes (present, may be empty) that highdicom copies from the first source; archives that
# dropped them (anonymised exports, synthetic series) get them empty rather than no SEG.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime")  # fmt: skip


# Patient Orientation letters of a biped (PS3.3 C.7.6.1.1.1): one to three per direction, no opposites.
_BIPED_DIRECTION = re.compile(r"[APRLHF]{1,3}")
_OPPOSITES = ({"A", "P"}, {"R", "L"}, {"H", "F"})


class SegRefused(Exception):
    """This case cannot have a SEG that references its sources (the message names why, no header text)."""


@dataclass
class Algorithm:
    """Who made the segment: name, version and parameters (model digests, config hash)."""

    name: str = MANUFACTURER
    version: str = ""  # default: the installed mcs-batch's version
    parameters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.version:
            try:
                self.version = metadata.version("mcs-batch")
            except metadata.PackageNotFoundError:
                self.version = "unknown"


def seg_uids(case_id: str, target: str, *, config_hash: str, instances: str | None) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID): one SEG series per case and configuration, one instance per
    target. Derived from (case, target, configuration, the case's instance set): a re-run, a retry or
    another OUT makes the same SEG the same object, so a PACS that stored it once never holds a second
    (outputs.dicomweb_store); a grown series (another instance set) is another SEG."""
    series = generate_uid(entropy_srcs=["mcs-batch seg series", config_hash, case_id, instances or ""])
    return series, generate_uid(entropy_srcs=["mcs-batch seg instance", config_hash, case_id, instances or "", target])


def read_source_headers(uris: Sequence[str], *, storage: StorageOptions | None) -> list[pydicom.Dataset]:
    """The sources' headers (everything before Pixel Data), in `uris` order, through fsspec (local, s3://);
    from a PACS, from its series metadata (one request per series, no instance fetched again)."""
    if uris and protocol_of(uris[0]) in dicomweb.SCHEMES:
        try:
            return _metadata_headers(uris, storage)
        except dicomweb.SeriesMetadataUnsupported:
            pass  # read as files: each instance retrieved whole
    headers = []
    for uri in uris:
        fs, path = filesystem_for(uri, storage)
        with fs.open(path, "rb") as f, _quiet():
            headers.append(pydicom.dcmread(f, stop_before_pixels=True, force=True))
    return headers


def _metadata_headers(uris: Sequence[str], storage: StorageOptions | None) -> list[pydicom.Dataset]:
    """Datasets of DICOMweb instances from their series' metadata (DICOM JSON), bulk data left out."""
    fs, _ = filesystem_for(uris[0], storage)
    by_uid: dict[str, dict] = {}
    for series in dict.fromkeys(fs._strip_protocol(u).rsplit("/instances/", 1)[0] for u in uris):
        for item in fs.series_metadata(series):
            values = (item.get("00080018") or {}).get("Value") or []
            if values:
                by_uid[str(values[0])] = item
    headers = []
    for uri in uris:
        uid = uri.rsplit("/", 1)[-1]
        if uid not in by_uid:
            raise SegRefused("a source instance is absent from its series' metadata")
        with _quiet():
            ds = pydicom.Dataset.from_json(by_uid[uid], bulk_data_uri_handler=lambda tag, vr, value: None)
        for tag in [e.tag for e in ds if e.value is None and e.VR in ("OB", "OW", "OF", "OD", "OL", "UN")]:
            del ds[tag]
        headers.append(ds)
    return headers


def source_frames(mask: np.ndarray, record: CaseRecord) -> np.ndarray:
    """uint8 [N, rows, columns]: frame n is the mask plane of source instance n (series), of source
    frame n + 1 (multi-frame), or the one plane (2D image). mask: uint8 [I, J, K], stored grid."""
    if mask.ndim != 3 or record.shape is None or list(mask.shape) != list(record.shape):
        raise SegRefused(f"mask shape {list(mask.shape)} is not the case's {record.shape}")
    ks = [0] if record.kind == CaseKind.DICOM_IMAGE else list(record.slice_index or range(mask.shape[2]))
    return np.ascontiguousarray(np.stack([mask[:, :, k].T for k in ks]).astype(np.uint8))


def voxels_without_source(mask: np.ndarray, record: CaseRecord) -> int:
    """Mask voxels on slice positions no source object holds (gaps in a series): not in the SEG."""
    return int(mask.sum()) - int(source_frames(mask, record).sum())


def _check_sources(record: CaseRecord, sources: Sequence[pydicom.Dataset], frames: np.ndarray) -> None:
    if record.kind not in SEG_KINDS:
        raise SegRefused(f"{record.kind} is not a DICOM image case")
    expected = len(frames) if record.kind == CaseKind.DICOM_SERIES else 1
    if len(sources) != expected:
        raise SegRefused(f"{len(sources)} source objects for {expected} expected")
    for ds in sources:
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != frames.shape[1:]:
            raise SegRefused(f"source image size differs from the mask's {list(frames.shape[1:])} (rows, columns)")
    if record.kind == CaseKind.DICOM_SERIES and "FrameOfReferenceUID" not in sources[0]:
        raise SegRefused("series without a frame of reference")
    if record.kind == CaseKind.DICOM_MULTIFRAME:
        groups = sources[0].get("PerFrameFunctionalGroupsSequence")
        if "FrameOfReferenceUID" not in sources[0] or not groups or len(groups) != len(frames):
            raise SegRefused("multi-frame object without a frame of reference and per-frame positions")


def patient_orientation(source: pydicom.Dataset) -> list[str] | None:
    """The SEG's Patient Orientation (row direction, column direction) from its source's: the SEG frame
    is the source's pixel grid, so the source's value holds as it is. None (an empty value, "unknown",
    which the Type 2 attribute allows) when the source has none, a malformed one, or a quadruped's
    (whose letters mean other directions unless Anatomical Orientation Type travels with them)."""
    if str(source.get("AnatomicalOrientationType") or "BIPED").strip().upper() != "BIPED":
        return None
    value = source.get("PatientOrientation")
    if not isinstance(value, pydicom.multival.MultiValue) or len(value) != 2:  # absent, empty or one value
        return None
    values = [str(v).strip() for v in value]
    for v in values:
        if not _BIPED_DIRECTION.fullmatch(v) or any(pair <= set(v) for pair in _OPPOSITES) or len(set(v)) < len(v):
            return None
    return values


def _has_plane_orientation(seg: pydicom.Dataset) -> bool:
    shared = seg.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    return any("PlaneOrientationSequence" in item for item in [*shared, *per_frame])


def _code(code: Code):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _content_label(label: str) -> str:
    """A DICOM CS value (upper case, digits, '_', at most 16 characters)."""
    return re.sub(r"[^A-Z0-9_]", "_", label.upper())[:16] or "SEGMENTATION"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """highdicom and pydicom warn with header values (a patient name that looks odd): not in our logs."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def build_segmentation(
    mask: np.ndarray,
    record: CaseRecord,
    sources: Sequence[pydicom.Dataset],
    *,
    label: str,
    codes: SegmentCodes,
    algorithm: Algorithm,
    series_uid: str,
    sop_uid: str,
    instance_number: int = 1,
    tiny: bool = False,
) -> pydicom.Dataset:
    """A binary DICOM SEG (highdicom.seg.Segmentation) of `mask` over `sources` (headers suffice: the
    case's source objects in source_uris order). mask: uint8 / bool [I, J, K] in the stored grid, 0/1.
    label: the segment's label (the target name); codes: its property category and type. Raises
    SegRefused when the sources cannot be referenced frame by frame."""
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    frames = source_frames(np.asarray(mask) > 0, record)
    _check_sources(record, sources, frames)
    for keyword in _TYPE2_COPIED:
        if keyword not in sources[0]:
            setattr(sources[0], keyword, None)
    dy_dx = [float(record.spacing_mm[1]), float(record.spacing_mm[0])]  # PixelSpacing: between rows, columns
    thickness = float(sources[0].get("SliceThickness") or 0) or float(record.spacing_mm[2])
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=_code(codes.category),
        segmented_property_type=_code(codes.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            version=algorithm.version,
            family=dcm_codes.cid7162.ArtificialIntelligence,
            parameters={k: v for k, v in algorithm.parameters.items() if v} or None,
        ),
    )
    description = "mcs-batch, TINY random models: meaningless" if tiny else "mcs-batch text-prompted segmentation"
    with _quiet():
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=frames if len(frames) > 1 else frames[0],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=series_uid,
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number="0",
            content_label=_content_label(label),
            content_description=description,
            pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=dy_dx, slice_thickness=thickness),
            omit_empty_frames=bool(frames.any()),  # all empty: every frame kept (none cannot be encoded)
        )
    if not _has_plane_orientation(seg):  # no frame of reference: General Image's Type 2C condition holds
        seg.PatientOrientation = patient_orientation(sources[0])  # highdicom leaves it out
    return seg


def seg_bytes(seg: pydicom.Dataset) -> bytes:
    """The SEG as a DICOM file (preamble and file meta)."""
    buffer = io.BytesIO()
    with _quiet():
        seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def safe_reason(error: BaseException, sources: Sequence[pydicom.Dataset] = ()) -> str:
    """`Type: message` of an error, with the values of the sources' patient attributes cut out."""
    return redact(f"{type(error).__name__}: {error}", sources)[:500]


def redact(text: str, sources: Sequence[pydicom.Dataset]) -> str:
    """`text` with the values of the sources' patient attributes (PATIENT_KEYWORDS), and their name
    components, replaced by <redacted>: longest first, so a value inside another goes with it."""
    pieces = set()
    for ds in sources:
        for keyword in PATIENT_KEYWORDS:
            value = ds.get(keyword)
            for part in value if isinstance(value, pydicom.multival.MultiValue) else [value]:
                if part is not None:
                    pieces.update(piece.strip() for piece in [str(part), *str(part).split("^")])
    for piece in sorted((p for p in pieces if len(p) >= 2), key=len, reverse=True):
        text = text.replace(piece, "<redacted>")
    return text
