"""Decode the pixels of a DICOM case into a Volume: every transfer syntax the pinned plugins cover.

Scalar images come out in physical units (Modality LUT: rescale slope/intercept -> HU for CT;
MONOCHROME1 inverted so that larger is brighter); YBR is converted to RGB, palette colour through
its lookup table; colour comes out as uint8 RGB.
"""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.storage import fetch_bytes
from mcs_batch.io.volume import Volume
from mcs_batch.records import CaseKind, CaseRecord


def _classify_decode_error(e: Exception) -> ErrorCode:
    """Map pydicom's decode exceptions onto our codes (their messages are the only signal)."""
    text = f"{type(e).__name__}: {e}".lower()
    if any(w in text for w in ("no plugin", "no pixel data handler", "plugins are missing", "unable to decompress")):
        return ErrorCode.UNSUPPORTED_TRANSFER_SYNTAX
    if any(w in text for w in ("too short", "truncat", "end of file", "eof", "insufficient", "not enough")):
        return ErrorCode.TRUNCATED
    return ErrorCode.DECODE_ERROR


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _rescale(ds, frame_index: int) -> tuple[float, float] | None:
    """Rescale slope/intercept of an enhanced object's frame (its per-frame group, else the shared
    group), or None when neither has a Pixel Value Transformation."""
    items = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame_index < len(per_frame):
        items.append(per_frame[frame_index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    for item in items:
        seq = item.get("PixelValueTransformationSequence")
        if seq:
            return float(seq[0].get("RescaleSlope", 1.0)), float(seq[0].get("RescaleIntercept", 0.0))
    return None


def _to_uint8_rgb(arr: np.ndarray, max_value: float) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    scale = 255.0 / max(max_value, 1.0)
    return np.clip(np.rint(arr.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def decoding_plugins(ds: pydicom.Dataset) -> list[str]:
    """The pixel decoders to try, in order: pydicom's plugins for the object's transfer syntax, GDCM only
    where no other is installed. Its Python binding lets a C++ exception abort the whole process on
    data that contradicts its header (an RGB JPEG 2000 stream declared as one sample per pixel, found
    by tests/io/test_header_fuzz.py), where pylibjpeg and Pillow raise an error. "" = pydicom's choice
    (native encodings need no plugin)."""
    try:
        plugins = list(get_decoder(ds.file_meta.TransferSyntaxUID).available_plugins)
    except Exception:  # no decoder for the syntax (native, unknown): pydicom says what is wrong
        return [""]
    return [p for p in plugins if p != "gdcm"] or plugins or [""]


def _pixel_array(ds: pydicom.Dataset) -> np.ndarray:
    """ds.pixel_array through the first plugin of `decoding_plugins` that decodes it."""
    first_error: Exception | None = None
    for plugin in decoding_plugins(ds):
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except Exception as e:
            first_error = first_error or e
    assert first_error is not None
    raise first_error


def _finite_rescale(ds: pydicom.Dataset, *, uri: str) -> None:
    """A rescale slope or intercept that is not a finite number makes every pixel NaN: refuse it."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value is not None and value != "" and not np.isfinite(float(value)):
            raise CaseError(f"{uri}: {keyword} {value} is not a finite number", code=ErrorCode.DECODE_ERROR)


def decode_frames(ds: pydicom.Dataset, *, uri: str) -> np.ndarray:
    """All frames of one object: float32 [F, rows, cols] (physical units) or uint8 [F, rows, cols, 3]."""
    try:
        arr = _pixel_array(ds)
    except Exception as e:
        code = _classify_decode_error(e)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise CaseError(f"{uri}: cannot decode pixel data ({name}): {e}", code=code) from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    spp = int(ds.get("SamplesPerPixel", 1))
    if frames == 1:
        arr = arr[None]
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        # Descriptors often claim 16 bits for 8-bit entries: scale by what the table holds.
        return _to_uint8_rgb(rgb, 255 if int(rgb.max(initial=0)) <= 255 else 65535)
    if spp == 3:
        bits = int(ds.get("BitsStored", 8))
        return _to_uint8_rgb(arr, 2**bits - 1)
    _finite_rescale(ds, uri=uri)
    per_frame = _rescale(ds, 0) if "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds else None
    if per_frame is not None:
        out = np.empty(arr.shape, np.float32)
        for f in range(frames):
            slope, intercept = _rescale(ds, f) or (1.0, 0.0)
            out[f] = arr[f].astype(np.float32) * slope + intercept
        lo_hi = [v * per_frame[0] + per_frame[1] for v in _stored_range(ds)]
    else:
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        lo, hi = _stored_range(ds)
        lo_hi = np.asarray(apply_modality_lut(np.array([lo, hi]), ds), dtype=np.float64).tolist()
    if photometric == "MONOCHROME1":
        out = np.float32(min(lo_hi) + max(lo_hi)) - out
    return out


def shown_as_stored(ds: pydicom.Dataset) -> bool:
    """8-bit greyscale without physical units: MONOCHROME2, unsigned, at most 8 bits stored, no Modality
    LUT and an identity rescale (if any), not CT. Its values reach the models as stored (io/window.py)."""
    rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    return (
        str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME2"
        and int(ds.get("SamplesPerPixel", 1)) == 1
        and int(ds.get("BitsStored", ds.get("BitsAllocated", 16))) <= 8
        and int(ds.get("PixelRepresentation", 0)) == 0
        and "ModalityLUTSequence" not in ds
        and rescale == (1.0, 0.0)
        and _rescale(ds, 0) in (None, (1.0, 0.0))
        and str(ds.get("Modality", "")).upper() != "CT"
    )


def read_dataset(data: bytes, *, uri: str) -> pydicom.Dataset:
    """Parse a whole object; a missing Transfer Syntax UID is filled in from the encoding pydicom
    detected while reading (objects without file meta are common in old archives)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:
        raise CaseError(f"{uri}: cannot parse DICOM ({type(e).__name__}: {e})", code=ErrorCode.DECODE_ERROR) from e
    if "TransferSyntaxUID" not in ds.file_meta and ds.is_little_endian is not None:
        if ds.is_implicit_VR:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if ds.is_little_endian else ExplicitVRBigEndian
    return ds


def load_dicom_case(
    record: CaseRecord, *, fs: fsspec.AbstractFileSystem | None = None, slices: slice | None = None
) -> Volume:
    """Decode a DICOM case (series, multi-frame or 2D) into a Volume with the record's geometry.

    slices: an optional range of k to load (bounded memory for long series); the affine is shifted
    so that the returned chunk keeps exact world coordinates.
    """
    shape = tuple(record.shape)
    k_range = range(shape[2])[slices] if slices is not None else range(shape[2])
    k0 = k_range.start if len(k_range) else 0
    affine = np.asarray(record.affine, float).reshape(4, 4).copy()
    affine[:3, 3] += affine[:3, 2] * k0
    chunk: np.ndarray | None = None
    filled = np.zeros(len(k_range), bool)
    as_stored: list[bool] = []  # shown_as_stored of each object read

    def frames_of(uri: str) -> np.ndarray:
        ds = read_dataset(fetch_bytes(fs, uri), uri=uri)
        as_stored.append(shown_as_stored(ds))
        return decode_frames(ds, uri=uri)

    def put(frame: np.ndarray, k: int):
        nonlocal chunk
        if k not in k_range:
            return
        if frame.shape[:2] != (shape[1], shape[0]):
            raise CaseError(
                f"{record.source_uris[0]}: frame of size {frame.shape[:2]} in a case of {shape[1]}x{shape[0]}",
                code=ErrorCode.INCONSISTENT_SERIES,
            )
        if chunk is None:
            extra = (3,) if frame.ndim == 3 else ()
            chunk = np.zeros((shape[0], shape[1], len(k_range), *extra), frame.dtype)
        chunk[:, :, k - k0] = np.swapaxes(frame, 0, 1)
        filled[k - k0] = True

    if record.kind == CaseKind.DICOM_SERIES:
        for uri, k in zip(record.source_uris, record.slice_index, strict=True):
            if k in k_range:
                put(frames_of(uri)[0], k)
    else:
        uri = record.source_uris[0]
        frames = frames_of(uri)
        ks = record.slice_index or list(range(frames.shape[0]))
        if len(ks) != frames.shape[0]:
            raise CaseError(f"{uri}: {frames.shape[0]} frames decoded, {len(ks)} expected", code=ErrorCode.DECODE_ERROR)
        for f, k in enumerate(ks):
            put(frames[f], k)
    if chunk is None:
        chunk = np.zeros((shape[0], shape[1], len(k_range)), np.float32)
    elif not filled.all() and chunk.dtype != np.uint8:
        chunk[:, :, ~filled] = chunk[:, :, filled].min()  # gap slices: the darkest value present
    return Volume(
        array=chunk,
        affine=affine,
        modality=record.modality,
        meta={"source": "dicom", "filled_slices": int((~filled).sum()), "as_stored": any(as_stored) and all(as_stored)},
    )
