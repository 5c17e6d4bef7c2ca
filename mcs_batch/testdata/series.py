"""Synthetic DICOM series with known geometry, for tests, benchmarks and the sample archive.

The pixel content is a smooth pattern plus a bright ellipsoid, so that slices differ and a
segmentation has something to find; the geometry is exactly what the caller asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def synthetic_uid(seed: str) -> str:
    """A deterministic, valid UID derived from `seed` (under pydicom's UID root)."""
    return generate_uid(entropy_srcs=["mcs-batch synthetic", seed])


def phantom_slice(rows: int, cols: int, k: int, n: int, *, modality: str = "CT") -> np.ndarray:
    """int16 [rows, cols]: background, a body disc and a bright ellipsoid centred in the volume."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    body = ((y - cy) / (0.45 * rows)) ** 2 + ((x - cx) / (0.45 * cols)) ** 2 <= 1
    z = (k - (n - 1) / 2) / max(n / 2, 1)
    blob = ((y - cy) / (0.2 * rows)) ** 2 + ((x - cx * 0.8) / (0.15 * cols)) ** 2 + z**2 <= 1
    base = -1000.0 if modality == "CT" else 0.0
    img = np.full((rows, cols), base, np.float32)
    img[body] = 40.0 if modality == "CT" else 300.0
    img[blob] = 300.0 if modality == "CT" else 900.0
    img += (x + y) % 7  # texture: slices are not flat
    return img.astype(np.int16)


def write_series(
    folder: Path,
    *,
    rows: int = 32,
    cols: int = 24,
    n_slices: int = 6,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),  # (between rows, between columns)
    slice_spacing: float = 2.5,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    modality: str = "CT",
    series_seed: str = "series",
    positions: Sequence[Sequence[float]] | None = None,
    drop: Sequence[int] = (),
    duplicate: Sequence[int] = (),
    shuffle_seed: int | None = 0,
    prefix: str = "slice",
) -> list[Path]:
    """Write one series of single-frame slices; returns the written paths (in file order).

    Slice k sits at origin + k * slice_spacing * normal unless `positions` are given. `drop` leaves
    out slices (gaps), `duplicate` writes a second, different object at a slice's position. File
    names are shuffled (by `shuffle_seed`) so that neither name nor InstanceNumber gives the order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    if positions is None:
        positions = [np.asarray(origin, float) + k * slice_spacing * normal for k in range(n_slices)]
    study_uid = synthetic_uid(series_seed + "/study")
    series_uid = synthetic_uid(series_seed)
    items = [(k, positions[k], "") for k in range(len(positions)) if k not in drop]
    items += [(k, positions[k], "dup") for k in duplicate]
    order = list(range(len(items)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    paths = []
    for file_no, idx in enumerate(order):
        k, pos, tag = items[idx]
        pixels = phantom_slice(rows, cols, k, len(positions), modality=modality)
        if tag:
            pixels = pixels + 1
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        sop_uid = synthetic_uid(f"{series_seed}/{prefix}/{k}/{tag}")
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = synthetic_uid(series_seed + "/frame-of-reference")
        ds.Modality = modality
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = 1000 - file_no  # deliberately unrelated to position
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_spacing:.6f}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        ds.PixelData = pixels.tobytes()
        path = folder / f"{prefix}{file_no:04d}{'.dcm' if file_no % 2 else ''}"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def oblique_orientation(degrees_about_z: float, degrees_about_x: float) -> tuple[float, ...]:
    """Row and column cosines of an axial plane rotated about z, then x."""
    a, b = np.deg2rad(degrees_about_z), np.deg2rad(degrees_about_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rx @ rz
    return (*r[:, 0].tolist(), *r[:, 1].tolist())
