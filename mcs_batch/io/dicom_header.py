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
    # A header that names its series but cannot be used (malformed geometry or size attributes,
    # truncated pixel data): the object fails with this code, and its series is grouped without it
    # (io/series.py). Geometry values that parse but are wrong (NaN, a zero vector) are judged when
    # grouping (geometry.dicom_geometry_problem), also for headers the archive index cached.
    error_code: str = ""
    error_message: str = ""

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


class _Malformed(ValueError):
    """A present attribute whose value cannot be used (garbage text, a wrong number of values)."""


def _get(ds, keyword: str):
    """An attribute's value, None when absent. _Malformed when its bytes do not parse as its VR
    (garbage DS text, a US of three bytes): pydicom parses values when they are first read."""
    try:
        return ds.get(keyword)
    except Exception as e:
        raise _Malformed(f"{keyword}: its value cannot be parsed ({type(e).__name__}: {e})"[:200]) from e


def _floats(value, n: int, keyword: str) -> list[float] | None:
    """n numbers, None when absent; _Malformed when present but not n numbers. NaN and infinity
    pass (geometry.dicom_geometry_problem says what is wrong with them, naming the attribute)."""
    if value is None or value == "":
        return None
    items = value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError) as e:
        raise _Malformed(f"{keyword} {_text(value)} is not {n} number(s)") from e
    if len(out) != n:
        raise _Malformed(f"{keyword} {_text(value)} holds {len(out)} value(s), not {n}")
    return out


def _text(value) -> str:
    return repr(list(value) if isinstance(value, pydicom.multival.MultiValue) else value)[:80]


def _spacing(value, keyword: str) -> list[float] | None:
    """A pixel spacing pair; None when absent or 0\\0 (how some writers say "unknown")."""
    out = _floats(value, 2, keyword)
    return None if out is None or out == [0.0, 0.0] else out


def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
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
        orientation = _floats(_get(plane, "ImageOrientationPatient"), 6, "ImageOrientationPatient")
    measures = _shared_group(ds, "PixelMeasuresSequence")
    if measures is not None:
        pixel_spacing = _spacing(_get(measures, "PixelSpacing"), "PixelSpacing")
        thickness = _float(_get(measures, "SliceThickness"))
    positions: list[list[float]] = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
        pos_seq = frame.get("PlanePositionSequence")
        pos = _floats(_get(pos_seq[0], "ImagePositionPatient"), 3, "ImagePositionPatient") if pos_seq else None
        if orientation is None and frame.get("PlaneOrientationSequence"):
            orientation = _floats(_get(frame.PlaneOrientationSequence[0], "ImageOrientationPatient"), 6,
                                  "ImageOrientationPatient")  # fmt: skip
        if pixel_spacing is None and frame.get("PixelMeasuresSequence"):
            pixel_spacing = _spacing(_get(frame.PixelMeasuresSequence[0], "PixelSpacing"), "PixelSpacing")
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


def _quiet(ds, keyword: str):
    """An attribute that only helps to group (instance, echo numbers): None when malformed."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def read_dicom_header(fileobj: BinaryIO, *, uri: str, rel: str, size: int) -> DicomHeader:
    """Parse a DICOM object's header from an open binary file, stopping before the pixel data.

    Raises CaseError(not_dicom) when the bytes are not a DICOM dataset. A dataset whose geometry or
    size attributes are malformed, or whose natively encoded pixel data is cut short, comes back with
    `error_code` set (bad_geometry, decode_error, truncated), so that it fails as a known member of
    its series instead of leaving an unexplained gap.
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

    return header_from_dataset(ds, uri=uri, rel=rel, size=size, header_bytes=header_bytes)


def header_from_metadata(metadata: dict, *, uri: str, rel: str) -> DicomHeader:
    """A header from an instance's DICOM JSON metadata (DICOMweb: WADO-RS series metadata, PS3.18
    F.2), without its pixel data: bulk data (Pixel Data included) are only noted as present. Its size
    is unknown (0), so the length of its pixel data is checked when the object is read, not here.

    Raises CaseError(not_dicom) when the JSON is not a dataset."""
    try:
        ds = pydicom.Dataset.from_json(metadata, bulk_data_uri_handler=lambda tag, vr, value: None)
    except Exception as e:  # pydicom raises several types on malformed JSON
        raise CaseError(f"{uri}: cannot parse DICOM JSON metadata ({type(e).__name__}: {e})"[:300],
                        code=ErrorCode.NOT_DICOM) from e  # fmt: skip
    return header_from_dataset(ds, uri=uri, rel=rel, size=0, header_bytes=0, has_pixel_data="PixelData" in ds)


def header_from_dataset(
    ds, *, uri: str, rel: str, size: int, header_bytes: int, has_pixel_data: bool | None = None
) -> DicomHeader:
    """What discovery needs from a dataset read without its pixel data (from a file: `header_bytes`
    is where its Pixel Data element starts; from DICOM JSON: `has_pixel_data` given, size 0)."""
    file_meta = getattr(ds, "file_meta", None)
    sop_class = str(
        _quiet(ds, "SOPClassUID") or (_quiet(file_meta, "MediaStorageSOPClassUID") if file_meta else "") or ""
    )
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
    elif has_pixel_data is not None:  # DICOM JSON: no encoding; the syntax a server may state
        syntax = str(_quiet(ds, "TransferSyntaxUID") or "")
    elif ds.is_little_endian is not None:
        # No file meta: pydicom guessed the encoding while reading.
        syntax = (
            "1.2.840.10008.1.2"
            if ds.is_implicit_VR
            else ("1.2.840.10008.1.2.1" if ds.is_little_endian else "1.2.840.10008.1.2.2")
        )

    problems: list[tuple[ErrorCode, str]] = []

    def attempt(code: ErrorCode, read, default=None):
        try:
            return read()
        except _Malformed as e:
            problems.append((code, str(e)))
        except Exception as e:  # a sequence or value pydicom cannot parse
            problems.append((code, f"{type(e).__name__}: {e}"[:200]))
        return default

    geometry, malformed = ErrorCode.BAD_GEOMETRY, ErrorCode.DECODE_ERROR
    frames = attempt(malformed, lambda: _int(_get(ds, "NumberOfFrames")), 1)
    if frames is None:
        frames = 1
    elif frames < 1:
        problems.append((malformed, f"NumberOfFrames {frames} is not a positive number"))
        frames = 1
    orientation = attempt(geometry, lambda: _floats(_get(ds, "ImageOrientationPatient"), 6, "ImageOrientationPatient"))
    pixel_spacing = attempt(geometry, lambda: _spacing(_get(ds, "PixelSpacing"), "PixelSpacing"))
    position = attempt(geometry, lambda: _floats(_get(ds, "ImagePositionPatient"), 3, "ImagePositionPatient"))
    thickness = attempt(geometry, lambda: _float(_get(ds, "SliceThickness")))
    frame_positions = None
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        e_orient, e_spacing, frame_positions, e_thick = attempt(geometry, lambda: _enhanced_geometry(ds),
                                                                (None, None, None, None))  # fmt: skip
        orientation = orientation or e_orient
        pixel_spacing = pixel_spacing or e_spacing
        thickness = thickness if thickness is not None else e_thick
    if pixel_spacing is None:
        # Projection radiographs: spacing at the detector (no magnification correction).
        pixel_spacing = attempt(geometry, lambda: _spacing(_get(ds, "ImagerPixelSpacing"), "ImagerPixelSpacing"))

    def integer(keyword: str) -> int | None:
        return attempt(malformed, lambda: _int(_get(ds, keyword)))

    image_type = [str(v) for v in (attempt(malformed, lambda: _get(ds, "ImageType")) or [])]
    header = DicomHeader(
        uri=uri,
        rel=rel,
        size=size,
        transfer_syntax=syntax,
        sop_class_uid=sop_class,
        sop_instance_uid=str(_quiet(ds, "SOPInstanceUID") or ""),
        study_uid=str(_quiet(ds, "StudyInstanceUID") or ""),
        series_uid=str(_quiet(ds, "SeriesInstanceUID") or ""),
        modality=str(_quiet(ds, "Modality") or ""),
        rows=integer("Rows"),
        columns=integer("Columns"),
        frames=frames,
        samples_per_pixel=integer("SamplesPerPixel") or 1,
        bits_allocated=integer("BitsAllocated"),
        photometric=str(attempt(malformed, lambda: _get(ds, "PhotometricInterpretation"), "") or ""),
        image_type=image_type,
        position=position,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_thickness=thickness,
        spacing_between_slices=attempt(geometry, lambda: _float(_get(ds, "SpacingBetweenSlices"))),
        acquisition_number=_int(_quiet(ds, "AcquisitionNumber")),
        echo_number=_int(_quiet(ds, "EchoNumbers")),
        temporal_position=_int(_quiet(ds, "TemporalPositionIdentifier")),
        instance_number=_int(_quiet(ds, "InstanceNumber")),
        frame_positions=frame_positions,
        # Deflated objects are read through zlib: the file position says nothing, trust the header.
        has_pixel_data=has_pixel_data if has_pixel_data is not None
        else ("Rows" in ds) if syntax == DEFLATED else header_bytes < size,
        header_bytes=header_bytes,
    )
    if problems:
        code = ErrorCode.BAD_GEOMETRY if any(c == ErrorCode.BAD_GEOMETRY for c, _ in problems) else problems[0][0]
        header.error_code = code
        header.error_message = f"{uri}: " + "; ".join(m for c, m in problems if c == code)
        return header
    if has_pixel_data is None:  # read from the object's bytes: its length is known
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


DEFLATE_MAX_RATIO = 1100  # zlib cannot shrink data more than ~1032:1


def _check_native_length(header: DicomHeader) -> None:
    """The pixel data the header declares must fit in the file, else the object is truncated
    (error_code): exactly for native encodings; for compressed ones, each frame takes an item of at
    least 8 bytes, so a NumberOfFrames past size / 8 is a header that lies (and would make us allocate
    for frames that do not exist)."""
    if not header.has_pixel_data:
        return
    if header.transfer_syntax not in _NATIVE_SYNTAXES:
        if header.frames > max(1, header.size // 8):
            header.error_code = ErrorCode.TRUNCATED
            header.error_message = (f"{header.uri}: declares {header.frames} frames, more than its "
                                    f"{header.size} bytes can hold")  # fmt: skip
        return
    if header.transfer_syntax == DEFLATED:  # the stored length says nothing about the file length
        expected = expected_native_bytes(header)
        if expected is not None and expected > DEFLATE_MAX_RATIO * header.size:
            header.error_code = ErrorCode.TRUNCATED
            header.error_message = f"{header.uri}: declares {expected} bytes of pixel data, more than deflate can hold"
        return
    expected = expected_native_bytes(header)
    if expected is None and header.rows and header.columns:  # bits unknown: at least one bit a sample
        expected = header.rows * header.columns * header.frames * header.samples_per_pixel // 8
    if expected is None:
        return
    # The Pixel Data element header itself takes 8 (implicit) or 12 (explicit OB/OW) bytes.
    available = header.size - header.header_bytes - 8
    if available < expected:
        header.error_code = ErrorCode.TRUNCATED
        header.error_message = (
            f"{header.uri}: truncated: pixel data needs {expected} bytes, only {max(available, 0)} present"
        )
