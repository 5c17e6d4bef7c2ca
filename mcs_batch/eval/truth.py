"""Ground truth as label maps in a prediction's geometry: PNG/JPEG masks, NIfTI label maps, DICOM SEG.

Every loader returns bool [I, J, K] indexed like the prediction's NIfTI mask (i along an image row,
j down a column, k across slices; see mcs_batch.io.volume), or raises TruthError saying why the truth
cannot be compared (a truth problem, not a prediction failure).

Foreground (documented rule, `label=None`):
- PNG / JPEG: any channel above half the value range (> 127 for 8-bit masks stored as 0/255; > 0 for
  masks stored as 0/1), so JPEG ringing around 0/255 masks does not count; with `label`, value == label.
- NIfTI: every nonzero label (e.g. left and right lung together); with `label`, that label only.
- DICOM SEG: the union of all segments; with `label`, the segment with that SegmentNumber or
  SegmentLabel (case-insensitive). FRACTIONAL segmentations: above half of MaximumFractionalValue.
"""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from PIL import Image, UnidentifiedImageError

from mcs_batch.io.nifti import HEADER_PROBE_BYTES, sniff_nifti
from mcs_batch.io.volume import LPS_TO_RAS

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
AFFINE_TOLERANCE_MM = 1e-3  # truth and prediction grids must agree this closely
GRID_TOLERANCE = 0.05  # SEG frame pixels must land within this fraction of a voxel of the grid


class TruthError(Exception):
    """A truth object that cannot be compared with its prediction (unreadable, wrong geometry, ...)."""


def _numeric_label(label: int | str | None) -> int | None:
    if label is None:
        return None
    if not str(label).strip().isdigit():
        raise TruthError(f"label {label!r}: labels of image and NIfTI truth are numbers")
    return int(label)


def image_mask(
    data: bytes, *, uri: str, shape: tuple[int, int, int] | None, label: int | str | None = None
) -> np.ndarray:
    """A PNG / JPEG mask [H, W] as bool [W, H, 1], the frame of a 2D prediction of `shape` (checked
    unless None)."""
    label = _numeric_label(label)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            colour = im.mode in ("P", "PA", "CMYK", "YCbCr", "RGBA", "LA", "La", "RGBa")  # alpha is not a label
            values = np.asarray(im.convert("RGB") if colour else im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise TruthError(f"{uri}: cannot decode mask image ({e})") from e
    if values.ndim == 3:  # colour masks (some releases colour each label): any channel
        values = values.max(axis=2) if label is None else values[..., 0]
    if label is not None:
        mask = values == label
    else:
        top = int(values.max()) if values.size else 0
        mask = values > (0 if top <= 1 else (127 if top <= 255 else top // 2))
    mask = mask.T[:, :, None]
    if shape is not None and mask.shape != tuple(shape):
        raise TruthError(
            f"{uri}: mask is {mask.shape[1]}x{mask.shape[0]} (HxW), the image {shape[1]}x{shape[0]}: not the same image"
        )
    return mask


def nifti_mask(
    data: bytes, *, uri: str, shape: tuple[int, int, int], affine: np.ndarray, label: int | str | None = None
) -> np.ndarray:
    """A NIfTI label map in the prediction's grid: the same shape and affine, or the same grid with
    axes permuted / flipped (reoriented here, labels never interpolated)."""
    label = _numeric_label(label)
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        kind = sniff_nifti(raw[:HEADER_PROBE_BYTES])
        if kind not in ("nifti1", "nifti2"):
            raise ValueError("not a single-file NIfTI-1/2")
        image = (nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image).from_bytes(raw)
        values = np.asarray(image.dataobj)
    except Exception as e:
        raise TruthError(f"{uri}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    while values.ndim > 3 and values.shape[-1] == 1:
        values = values[..., 0]
    while values.ndim < 3:
        values = values[..., None]
    if values.ndim != 3:
        raise TruthError(f"{uri}: a label map must be 3D (or 2D), got shape {values.shape}")
    mask = values > 0 if label is None else values == label
    truth_affine = np.asarray(image.affine, float)
    target = np.asarray(affine, float).reshape(4, 4)
    if mask.shape == tuple(shape) and np.allclose(truth_affine, target, atol=AFFINE_TOLERANCE_MM):
        return mask
    transform = ornt_transform(io_orientation(truth_affine), io_orientation(target))
    moved = apply_orientation(mask, transform)
    moved_affine = truth_affine @ inv_ornt_aff(transform, mask.shape)
    if moved.shape == tuple(shape) and np.allclose(moved_affine, target, atol=AFFINE_TOLERANCE_MM):
        return np.ascontiguousarray(moved)
    raise TruthError(
        f"{uri}: label map grid (shape {mask.shape}) differs from the prediction's (shape {tuple(shape)}) beyond "
        f"axis flips; resample the truth onto the image grid first"
    )


# -- DICOM SEG ---------------------------------------------------------------------------------------


def read_seg(data: bytes, *, uri: str) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:
        raise TruthError(f"{uri}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise TruthError(f"{uri}: not a DICOM Segmentation object (SOP class {ds.get('SOPClassUID', '?')})")
    return ds


def seg_references(ds: pydicom.Dataset) -> tuple[list[str], list[str]]:
    """(referenced SeriesInstanceUIDs, referenced SOPInstanceUIDs) of a SEG, in file order."""
    series, sops = [], []
    for item in ds.get("ReferencedSeriesSequence", []):
        if item.get("SeriesInstanceUID"):
            series.append(str(item.SeriesInstanceUID))
        sops.extend(str(i.ReferencedSOPInstanceUID) for i in item.get("ReferencedInstanceSequence", []))
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            sops.extend(str(s.ReferencedSOPInstanceUID) for s in derivation.get("SourceImageSequence", []))
    return series, list(dict.fromkeys(sops))


def _selected_segments(ds: pydicom.Dataset, label: int | str | None, uri: str) -> set[int]:
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in ds.get("SegmentSequence", [])}
    if not segments:
        raise TruthError(f"{uri}: SEG without SegmentSequence")
    if label is None:
        return set(segments)
    text = str(label).strip()
    if text.isdigit() and int(text) in segments:
        return {int(text)}
    chosen = {n for n, name in segments.items() if name.lower() == text.lower()}
    if not chosen:
        listed = ", ".join(f"{n} {name!r}" for n, name in sorted(segments.items()))
        raise TruthError(f"{uri}: no segment {label!r} (segments: {listed})")
    return chosen


def _group(frame, shared, name: str):
    """The functional group `name` (e.g. PlanePositionSequence) of a frame, else the shared one."""
    for source in (frame, shared):
        if source is not None and name in source and len(source[name].value):
            return source[name].value[0]
    return None


def seg_mask(
    ds: pydicom.Dataset,
    *,
    uri: str,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    label: int | str | None = None,
) -> np.ndarray:
    """Decode a SEG onto the prediction's voxel grid (shape, RAS affine) by the frames' patient
    positions; a SEG of one 2D image without positions maps its frame onto the image directly."""
    selected = _selected_segments(ds, label, uri)
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as e:
        raise TruthError(f"{uri}: cannot decode SEG pixel data ({type(e).__name__}: {e})") from e
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        frames = frames > int(ds.get("MaximumFractionalValue", 255)) / 2
    else:
        frames = frames > 0
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    if len(per_frame) < n_frames:
        raise TruthError(f"{uri}: {n_frames} frames but {len(per_frame)} per-frame functional groups")
    shared_seq = ds.get("SharedFunctionalGroupsSequence", [])
    shared = shared_seq[0] if len(shared_seq) else None
    to_index = np.linalg.inv(np.asarray(affine, float).reshape(4, 4)) @ LPS_TO_RAS  # LPS mm -> (i, j, k)
    mask = np.zeros(shape, bool)
    for f in range(n_frames):
        ident = _group(per_frame[f], shared, "SegmentIdentificationSequence")
        if ident is None or int(ident.ReferencedSegmentNumber) not in selected or not frames[f].any():
            continue
        position = _group(per_frame[f], shared, "PlanePositionSequence")
        if position is None:
            if shape[2] != 1 or frames.shape[1:] != (shape[1], shape[0]):
                raise TruthError(f"{uri}: frame {f + 1} has no ImagePositionPatient and the case is not one 2D image")
            mask[:, :, 0] |= frames[f].T
            continue
        orientation = _group(per_frame[f], shared, "PlaneOrientationSequence")
        measures = _group(per_frame[f], shared, "PixelMeasuresSequence")
        if orientation is None or measures is None:
            raise TruthError(f"{uri}: frame {f + 1} lacks ImageOrientationPatient or PixelSpacing")
        iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
        dy, dx = (float(v) for v in measures.PixelSpacing)
        origin = np.asarray([float(v) for v in position.ImagePositionPatient])
        r, c = np.nonzero(frames[f])
        lps = origin + np.outer(c * dx, iop[:3]) + np.outer(r * dy, iop[3:])
        ijk = (to_index @ np.c_[lps, np.ones(len(lps))].T)[:3].T
        index = np.rint(ijk).astype(int)
        if np.abs(ijk - index).max() > GRID_TOLERANCE:
            raise TruthError(f"{uri}: frame {f + 1} does not lie on the case's voxel grid (different geometry)")
        if (index < 0).any() or (index >= np.asarray(shape)).any():
            raise TruthError(f"{uri}: frame {f + 1} reaches outside the case's volume")
        mask[index[:, 0], index[:, 1], index[:, 2]] = True
    return mask
