"""Read what discovery needs from a DICOM object's header, without touching its pixel data.

Only the bytes up to the Pixel Data element are read (on S3: a few ranged reads). The result is a
plain `DicomHeader` that can travel between Ray tasks. Patient-identifying attributes are never
copied out of the dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from mcs_batch.errors import CaseError, ErrorCode

# Transfer syntaxes whose pixel data is stored natively (uncompressed): their length is known.
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian (length checked after inflating)
}

# Modalities of objects that are not images to segment.
NON_IMAGE_MODALITIES = {
    "SR", "RTSTRUCT", "SEG", "PR", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE_PLAN", "KO", "REG",
    "ECG", "HD", "AU", "DOC", "PLAN", "FID", "RWV", "RESP", "EPS", "IVOCT_PLAN",
}  # fmt: skip
# Words in a SOP class name that mark a non-image object.
_NON_IMAGE_SOP_WORDS = (
    "SR Storage", "Structure Set", "Segmentation", "Presentation State", "Waveform", "Plan Storage",
    "Dose Storage", "Directory", "Registration", "Key Object", "Encapsulated", "Treatment Record",
    "Raw Data", "Spectroscopy", "Surface", "Parametric Map",
)  # fmt: skip
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class DicomHeader:
    """What grouping and geometry need, from one DICOM object (no patient data)."""

    uri: str
    rel: str  # path relative to the input root ('/'-separated): stable across storage backends
    size: int
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    rows: int | None
    columns: int | None
    frames: int
    samples_per_pixel: int
    bits_allocated: int | None
    photometric: str
    image_type: list[str] = field(default_factory=list)
    position: list[float] | None = None  # ImagePositionPatient, LPS mm
    orientation: list[float] | None = None  # ImageOrientationPatient: row cosines, column cosines
    pixel_spacing: list[float] | None = None  # [between rows, between columns] mm
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    acquisition_number: int | None = None
    echo_number: int | None = None
    temporal_position: int | None = None
    instance_number: int | None = None
    frame_positions: list[list[float]] | None = None  # enhanced multi-frame: per-frame positions
    has_pixel_data: bool = False
    header_bytes: int = 0  # where the Pixel Data element starts
    bytes_read: int = 0  # bytes fetched from storage to read this header

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DicomHeader:
        return cls(**d)

    @property
    def is_localizer(self) -> bool:
        return any(t.strip().upper() == "LOCALIZER" for t in self.image_type)

    @property
    def is_volume_slice(self) -> bool:
        """A single-frame image with full patient geometry: a candidate slice of a 3D series."""
        return (
            self.frames <= 1
            and self.position is not None
            and self.orientation is not None
            and self.pixel_spacing is not None
        )


def _floats(value, n: int | None = None) -> list[float] | None:
    if value is None:
        return None
    try:
        out = [float(v) for v in (value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value])]
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out


def _spacing(value) -> list[float] | None:
    """A pixel spacing pair, or None when absent or not positive (some writers store 0\\0)."""
    out = _floats(value, 2)
    if out is None or not all(v > 0 and v == v and v != float("inf") for v in out):
        return None
    return out


def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _shared_group(ds, item: str):
    """The first item of `item` inside the Shared Functional Groups, or None."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        inner = shared[0].get(item)
        if inner:
            return inner[0]
    return None


def _enhanced_geometry(
    ds,
) -> tuple[list[float] | None, list[float] | None, list[list[float]] | None, float | None]:
    """Orientation, pixel spacing, per-frame positions and slice thickness of an enhanced object."""
    orientation = pixel_spacing = thickness = None
    plane = _shared_group(ds, "PlaneOrientationSequence")
    if plane is not None:
        orientation = _floats(plane.get("ImageOrientationPatient"), 6)
    measures = _shared_group(ds, "PixelMeasuresSequence")
    if measures is not None:
        pixel_spacing = _spacing(measures.get("PixelSpacing"))
        thickness = _float(measures.get("SliceThickness"))
    positions: list[list[float]] = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
        pos_seq = frame.get("PlanePositionSequence")
        pos = _floats(pos_seq[0].get("ImagePositionPatient"), 3) if pos_seq else None
        if orientation is None and frame.get("PlaneOrientationSequence"):
            orientation = _floats(frame.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
        if pixel_spacing is None and frame.get("PixelMeasuresSequence"):
            pixel_spacing = _spacing(frame.PixelMeasuresSequence[0].get("PixelSpacing"))
        if pos is None:
            return orientation, pixel_spacing, None, thickness
        positions.append(pos)
    return orientation, pixel_spacing, positions or None, thickness


def non_image_reason(header: DicomHeader) -> str | None:
    """Why this object is not an image to segment, or None when it is one."""
    if header.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR (media storage directory)"
    if header.modality.upper() in NON_IMAGE_MODALITIES:
        return f"modality {header.modality} is not an image"
    name = UID(header.sop_class_uid).name if header.sop_class_uid else ""
    if any(word in name for word in _NON_IMAGE_SOP_WORDS):
        return f"SOP class {name}"
    return None


def read_dicom_header(fileobj: BinaryIO, *, uri: str, rel: str, size: int) -> DicomHeader:
    """Parse a DICOM object's header from an open binary file, stopping before the pixel data.

    Raises CaseError(not_dicom) when the bytes are not a DICOM dataset, CaseError(truncated) when a
    natively encoded object is shorter than its declared pixel data.
    """
    try:
        ds = pydicom.dcmread(fileobj, stop_before_pixels=True, force=True)
        header_bytes = fileobj.tell()
    except InvalidDicomError as e:
        raise CaseError(f"{uri}: not a DICOM object ({e})", code=ErrorCode.NOT_DICOM) from e
    except EOFError as e:
        raise CaseError(f"{uri}: file ends inside the DICOM header", code=ErrorCode.TRUNCATED) from e
    except Exception as e:  # pydicom raises many types on garbage
        raise CaseError(f"{uri}: cannot parse DICOM header ({type(e).__name__}: {e})", code=ErrorCode.NOT_DICOM) from e

    file_meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (file_meta.get("MediaStorageSOPClassUID", "") if file_meta else ""))
    has_preamble = getattr(ds, "preamble", None) is not None
    plausible = sop_class or "Rows" in ds or "SeriesInstanceUID" in ds or "Modality" in ds
    if not plausible:
        raise CaseError(
            f"{uri}: no DICOM attributes found" + ("" if has_preamble else " (no 'DICM' preamble)"),
            code=ErrorCode.NOT_DICOM,
        )

    syntax = ""
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        syntax = str(file_meta.TransferSyntaxUID)
    elif ds.is_little_endian is not None:
        # No file meta: pydicom guessed the encoding while reading.
        syntax = (
            "1.2.840.10008.1.2"
            if ds.is_implicit_VR
            else ("1.2.840.10008.1.2.1" if ds.is_little_endian else "1.2.840.10008.1.2.2")
        )

    frames = _int(ds.get("NumberOfFrames")) or 1
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    pixel_spacing = _spacing(ds.get("PixelSpacing"))
    position = _floats(ds.get("ImagePositionPatient"), 3)
    thickness = _float(ds.get("SliceThickness"))
    frame_positions = None
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        e_orient, e_spacing, frame_positions, e_thick = _enhanced_geometry(ds)
        orientation = orientation or e_orient
        pixel_spacing = pixel_spacing or e_spacing
        thickness = thickness if thickness is not None else e_thick
    if pixel_spacing is None:
        # Projection radiographs: spacing at the detector (no magnification correction).
        pixel_spacing = _spacing(ds.get("ImagerPixelSpacing"))

    image_type = [str(v) for v in (ds.get("ImageType") or [])]
    header = DicomHeader(
        uri=uri,
        rel=rel,
        size=size,
        transfer_syntax=syntax,
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        frames=frames,
        samples_per_pixel=_int(ds.get("SamplesPerPixel")) or 1,
        bits_allocated=_int(ds.get("BitsAllocated")),
        photometric=str(ds.get("PhotometricInterpretation", "") or ""),
        image_type=image_type,
        position=position,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_thickness=thickness,
        spacing_between_slices=_float(ds.get("SpacingBetweenSlices")),
        acquisition_number=_int(ds.get("AcquisitionNumber")),
        echo_number=_int(ds.get("EchoNumbers")),
        temporal_position=_int(ds.get("TemporalPositionIdentifier")),
        instance_number=_int(ds.get("InstanceNumber")),
        frame_positions=frame_positions,
        # Deflated objects are read through zlib: the file position says nothing, trust the header.
        has_pixel_data=("Rows" in ds) if syntax == DEFLATED else header_bytes < size,
        header_bytes=header_bytes,
    )
    _check_native_length(header)
    return header


def expected_native_bytes(header: DicomHeader) -> int | None:
    """Bytes of natively encoded pixel data the header declares, or None when unknown."""
    if not (header.rows and header.columns and header.bits_allocated):
        return None
    n = header.rows * header.columns * header.frames * header.samples_per_pixel
    if header.photometric.upper() in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        n = n * 2 // 3  # chroma subsampled horizontally: 2 samples per pixel on average
    if header.bits_allocated == 1:
        return (n + 7) // 8
    return n * ((header.bits_allocated + 7) // 8)


def _check_native_length(header: DicomHeader) -> None:
    """Natively encoded pixel data must fit in the file: else the object is truncated."""
    if not header.has_pixel_data or header.transfer_syntax not in _NATIVE_SYNTAXES:
        return
    if header.transfer_syntax == DEFLATED:
        return  # deflated: the stored length says nothing about the file length
    expected = expected_native_bytes(header)
    if expected is None:
        return
    # The Pixel Data element header itself takes 8 (implicit) or 12 (explicit OB/OW) bytes.
    available = header.size - header.header_bytes - 8
    if available < expected:
        raise CaseError(
            f"{header.uri}: truncated: pixel data needs {expected} bytes, only {max(available, 0)} present",
            code=ErrorCode.TRUNCATED,
        )
