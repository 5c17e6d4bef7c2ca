"""Hypothesis strategies that break real headers the way archives break them.

DICOM: a file of pydicom's own test corpus, or a slice of a small synthetic series, with values of the
geometry, size, rescale, bits and transfer-syntax fields replaced by NaN, inf, huge, negative, zero,
empty or malformed text, written with the wrong VR (as raw `UN` bytes the reader re-interprets), and
optionally truncated. NIfTI: nibabel's test files with dims, pixdim, the sform / qform, the scaling,
the data type and the data offset replaced, optionally truncated or re-compressed. PNG: a small real
image whose IHDR claims another size (its CRC kept valid). Values are written raw: no validation of
ours or of the writer stands between the mutation and the reader.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

MAX_CORPUS_BYTES = 200_000  # small files: thousands of examples stay quick


@functools.cache
def dicom_corpus() -> tuple[Path, ...]:
    """pydicom's bundled test files (images, non-images, broken ones), the small ones (read from the
    package folder: pydicom's own lookup may try to download its external files)."""
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    files = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size <= MAX_CORPUS_BYTES]
    return tuple(sorted(p for p in files if p.suffix not in (".json", ".py", ".txt", ".gz", ".bz2", ".zip")))


@functools.cache
def nifti_corpus() -> tuple[Path, ...]:
    from nibabel.testing import data_path

    root = Path(data_path)
    return tuple(
        sorted(p for p in root.iterdir() if p.name.endswith((".nii", ".nii.gz")) and p.stat().st_size < 400_000)
    )


# -- DICOM ----------------------------------------------------------------------------------------------

DECIMAL_TEXT = [b"NaN", b"nan", b"inf", b"-inf", b"Infinity", b"1e308", b"-1e400", b"0", b"-0", b"-5", b"",
                b"abc", b"1..2", b" ", b"\x00\xff", b"3e-320"]  # fmt: skip
INTEGER_TEXT = [b"0", b"-1", b"1", b"4294967296", b"1000000000", b"", b"x", b"2.5", b"NaN"]
# tag, VR, values per element (None: any number)
DECIMAL_FIELDS = {
    "ImagePositionPatient": (0x00200032, 3),
    "ImageOrientationPatient": (0x00200037, 6),
    "PixelSpacing": (0x00280030, 2),
    "ImagerPixelSpacing": (0x00181164, 2),
    "SliceThickness": (0x00180050, 1),
    "SpacingBetweenSlices": (0x00180088, 1),
    "RescaleSlope": (0x00281053, 1),
    "RescaleIntercept": (0x00281052, 1),
    "WindowCenter": (0x00281050, 1),
}
SHORT_FIELDS = {  # US: binary 16-bit
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "HighBit": 0x00280102,
    "SamplesPerPixel": 0x00280002,
    "PixelRepresentation": 0x00280103,
}
INTEGER_STRING_FIELDS = {"NumberOfFrames": 0x00280008, "InstanceNumber": 0x00200013, "AcquisitionNumber": 0x00200012}
PHOTOMETRIC = [b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR", b"YBR_FULL_422", b"YBR_FULL", b"", b"XYZ"]
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
                     "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99", "1.2.3.4",
                     ""]  # fmt: skip


def _even(raw: bytes) -> bytes:
    return raw if len(raw) % 2 == 0 else raw + b" "


@st.composite
def decimal_value(draw, n: int) -> bytes:
    """A DS value: n numbers with some of them broken, or a wrong number of them."""
    count = draw(st.sampled_from([n, n, n, max(n - 1, 0), n + 1]))
    good = st.floats(min_value=-500, max_value=500, allow_nan=False).map(lambda v: f"{v:.4g}".encode())
    parts = [draw(st.one_of(good, st.sampled_from(DECIMAL_TEXT))) for _ in range(count)]
    return _even(b"\\".join(parts))


@st.composite
def dicom_mutation(draw) -> tuple[str, int, bytes]:
    """(field, tag, raw value bytes), written with VR UN so that the reader applies the dictionary VR."""
    kind = draw(st.sampled_from(["decimal", "decimal", "short", "int_string", "photometric"]))
    if kind == "decimal":
        name = draw(st.sampled_from(sorted(DECIMAL_FIELDS)))
        tag, n = DECIMAL_FIELDS[name]
        return name, tag, draw(decimal_value(n))
    if kind == "short":
        name = draw(st.sampled_from(sorted(SHORT_FIELDS)))
        value = draw(st.one_of(st.sampled_from([0, 1, 3, 7, 8, 12, 16, 32, 64, 255, 65535]), st.integers(0, 65535)))
        raw = struct.pack("<H", value)
        raw = draw(st.sampled_from([raw, raw, raw[:1] + b"\x00\x00\x00", b""]))  # wrong lengths too
        return name, SHORT_FIELDS[name], raw
    if kind == "int_string":
        name = draw(st.sampled_from(sorted(INTEGER_STRING_FIELDS)))
        return name, INTEGER_STRING_FIELDS[name], _even(draw(st.sampled_from(INTEGER_TEXT)))
    return "PhotometricInterpretation", 0x00280004, _even(draw(st.sampled_from(PHOTOMETRIC)))


def mutate_dicom(data: bytes, mutations: list[tuple[str, int, bytes]], syntax: str | None) -> bytes:
    """The object with each mutation applied (an element replaced or added), re-encoded as it was."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    for _, tag, raw in mutations:  # raw: written as these bytes, read back with the dictionary's VR
        ds._dict[Tag(tag)] = RawDataElement(Tag(tag), "UN", len(raw), raw, 0, ds.is_implicit_VR, ds.is_little_endian)
    if syntax is not None:
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
        ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=False)
    return out.getvalue()


@st.composite
def truncation(draw, size: int) -> int | None:
    """None (whole file) most of the time, else where to cut it."""
    if size < 2 or not draw(st.booleans()) or not draw(st.booleans()):
        return None
    return draw(st.integers(0, size - 1))


# -- NIfTI ----------------------------------------------------------------------------------------------

NIFTI_FLOATS = [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e38, 1e-38, 2.0]


@st.composite
def nifti_mutation(draw) -> tuple[str, int | None, float]:
    """(header field, index in it or None, value)."""
    field = draw(st.sampled_from(["dim", "pixdim", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c",
                                  "quatern_d", "qoffset_x", "scl_slope", "scl_inter", "sform_code", "qform_code",
                                  "datatype", "bitpix", "vox_offset"]))  # fmt: skip
    if field == "dim":
        index = draw(st.integers(0, 7))
        value = draw(st.sampled_from([0, 1, -1, 2, 3, 5, 7, 8, 32767, 20000]))
    elif field in ("sform_code", "qform_code"):
        index, value = None, draw(st.sampled_from([0, 1, 2, 5, -3, 99]))
    elif field == "datatype":
        index, value = None, draw(st.sampled_from([0, 1, 2, 4, 8, 16, 64, 128, 256, 2304, 1536, 31000]))
    elif field == "bitpix":
        index, value = None, draw(st.sampled_from([0, 1, 8, 13, 64]))
    elif field == "vox_offset":
        index, value = None, draw(st.sampled_from([0.0, -352.0, 1e9, np.nan, 352.5]))
    else:
        index = draw(st.integers(0, 7 if field == "pixdim" else 3)) if field.startswith(("pixdim", "srow")) else None
        value = draw(st.sampled_from(NIFTI_FLOATS))
    return field, index, value


def mutate_nifti(data: bytes, mutations: list[tuple[str, int | None, float]], gzipped: bool | None) -> bytes:
    """The file with header fields overwritten in place (no validation), re-compressed as asked."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    header_class = nib.Nifti2Header if struct.unpack("<i", raw[:4])[0] in (540, 469893120) else nib.Nifti1Header
    n = header_class.sizeof_hdr
    header = header_class(binaryblock=raw[:n], check=False)
    fields = header.structarr
    for field, index, value in mutations:
        if field not in fields.dtype.names:
            continue
        with np.errstate(all="ignore"), contextlib.suppress(ValueError, OverflowError):  # NaN in an int field
            if index is None:
                fields[field] = value
            else:
                fields[field][index] = value
    raw = fields.tobytes() + raw[n:]
    if gzipped is None:
        gzipped = data[:2] == b"\x1f\x8b"
    return gzip.compress(raw, mtime=0) if gzipped else raw


# -- PNG ------------------------------------------------------------------------------------------------


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (CRC recomputed, pixel data unchanged)."""
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:16] + ihdr + crc + data[33:]
