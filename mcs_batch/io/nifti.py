"""NIfTI-1 / NIfTI-2 files (.nii, .nii.gz): header for discovery, volume for loading.

The affine is nibabel's best affine (sform, else qform), which is already index -> RAS mm.
A 4D file contributes its first volume (the record says so); 5D and more are refused.
"""

from __future__ import annotations

import gzip
import struct
from typing import BinaryIO

import nibabel as nib
import numpy as np

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.geometry import check_affine
from mcs_batch.io.volume import Volume
from mcs_batch.records import CaseKind, CaseRecord, make_case_id

HEADER_PROBE_BYTES = 544  # a NIfTI-2 header is 540 bytes, plus the extension flag
NIFTI_AFFINE = "the NIfTI affine (sform / qform)"


def sniff_nifti(head: bytes) -> str | None:
    """'nifti1', 'nifti2', 'nifti_pair' for the first bytes of an (uncompressed) header, else None."""
    if len(head) < 348:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348 and head[344:347] in (b"n+1", b"ni1"):
            return "nifti1" if head[344:347] == b"n+1" else "nifti_pair"
        if sizeof_hdr == 540 and len(head) >= 8 and head[4:7] in (b"n+2", b"ni2"):
            return "nifti2" if head[4:7] == b"n+2" else "nifti_pair"
    return None


def _header_class(kind: str):
    return nib.Nifti2Header if kind == "nifti2" else nib.Nifti1Header


def _first_bytes(fileobj: BinaryIO, gzipped: bool, n: int) -> bytes:
    if gzipped:
        with gzip.GzipFile(fileobj=fileobj) as gz:
            return gz.read(n)
    return fileobj.read(n)


def nifti_record(fileobj: BinaryIO, *, uri: str, rel: str, gzipped: bool) -> CaseRecord:
    """Build the case record from the header alone (a few hundred bytes, decompressed on the fly)."""
    try:
        head = _first_bytes(fileobj, gzipped, HEADER_PROBE_BYTES)
    except (OSError, EOFError) as e:
        raise CaseError(f"{uri}: cannot decompress NIfTI header ({e})", code=ErrorCode.TRUNCATED) from e
    kind = sniff_nifti(head)
    if kind is None:
        raise CaseError(f"{uri}: not a NIfTI-1/2 header", code=ErrorCode.NOT_DICOM)
    if kind == "nifti_pair":
        raise CaseError(
            f"{uri}: NIfTI header/image pair (.hdr/.img) is not supported; convert to a single .nii",
            code=ErrorCode.UNSUPPORTED_FORMAT,
        )
    try:
        header_class = _header_class(kind)
        header = header_class(binaryblock=head[: header_class.sizeof_hdr])  # extensions are not needed
        shape = tuple(int(s) for s in header.get_data_shape())
        affine = np.asarray(header.get_best_affine(), float)
    except Exception as e:
        raise CaseError(f"{uri}: invalid NIfTI header ({e})", code=ErrorCode.DECODE_ERROR) from e
    check_affine(affine, name=uri, what=NIFTI_AFFINE)
    warnings: list[str] = []
    volume_index = None
    if not 2 <= len(shape) <= 4 or any(s < 1 for s in shape):
        raise CaseError(
            f"{uri}: {len(shape)}D NIfTI of shape {shape} not supported",
            code=ErrorCode.UNSUPPORTED_DIMENSIONS,
        )
    if len(shape) == 4:
        volume_index = 0
        if shape[3] > 1:
            warnings.append(f"4D NIfTI with {shape[3]} volumes: the first volume is used")
        shape = shape[:3]
    shape = (*shape, 1, 1)[:3]
    return CaseRecord(
        case_id=make_case_id(f"file:{rel}"),
        kind=CaseKind.NIFTI,
        source_uris=[uri],
        source_keys=[rel],
        shape=list(shape),
        spacing_mm=[float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        affine=[float(v) for v in affine.reshape(-1)],
        volume_index=volume_index,
        warnings=warnings,
    )


def load_nifti(data: bytes, *, uri: str, record: CaseRecord, slices: slice | None = None) -> Volume:
    """Decode a NIfTI file's bytes into a Volume (float32, scaled by scl_slope/scl_inter; uint8
    without scaling is marked `as_stored`, see io/window.py)."""
    gzipped = data[:2] == b"\x1f\x8b"
    try:
        raw = gzip.decompress(data) if gzipped else data
    except (OSError, EOFError) as e:
        raise CaseError(f"{uri}: truncated or corrupt gzip stream ({e})", code=ErrorCode.TRUNCATED) from e
    kind = sniff_nifti(raw[:HEADER_PROBE_BYTES])
    image_class = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
    try:
        img = image_class.from_bytes(raw)
        proxy = img.dataobj
        index: tuple = (slice(None), slice(None), slices or slice(None))
        if len(img.shape) == 4:
            index = (*index, record.volume_index or 0)
        array = np.asarray(proxy[index], dtype=np.float32)
        as_stored = img.get_data_dtype() == np.uint8 and (proxy.slope, proxy.inter) == (1.0, 0.0)
    except Exception as e:
        code = ErrorCode.TRUNCATED if "too short" in str(e) or "Expected" in str(e) else ErrorCode.DECODE_ERROR
        raise CaseError(f"{uri}: cannot read NIfTI data ({type(e).__name__}: {e})", code=code) from e
    while array.ndim < 3:
        array = array[..., None]
    affine = np.asarray(img.affine, float)
    check_affine(affine, name=uri, what=NIFTI_AFFINE)
    if slices is not None and slices.start:
        affine = affine.copy()
        affine[:3, 3] += affine[:3, 2] * slices.start
    meta = {"source": "nifti", "as_stored": bool(as_stored)}  # uint8 without scaling: shown as stored
    return Volume(array=array, affine=affine, modality=record.modality, meta=meta)
