"""DICOM patient geometry -> NIfTI/RAS affines, and slice ordering along the slice normal.

DICOM (LPS): world = IPP + i * PixelSpacing[1] * row_cosines + j * PixelSpacing[0] * column_cosines,
with i the column index and j the row index. The affine here maps the array index (i, j, k) of the
NIfTI-ordered array (see io/volume.py) to RAS millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.volume import LPS_TO_RAS

POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal share a position
SPACING_TOLERANCE = 0.02  # relative deviation allowed between slice gaps and the nominal spacing
COSINE_TOLERANCE = 0.01  # direction cosines: unit length and orthogonality, within this (written rounded)
MIN_VOXEL_MM, MAX_VOXEL_MM = 1e-6, 1e6  # voxel sizes outside this range are no geometry (a nm, a km)
COLLAPSED_AXES = 1e-3  # |det| of an affine's unit axis directions below this: the axes (nearly) coincide


def _finite(values) -> bool:
    return bool(np.all(np.isfinite(np.asarray(values, float))))


def dicom_geometry_problem(
    *,
    position: list[float] | None,
    orientation: list[float] | None,
    pixel_spacing: list[float] | None,
    frame_positions: list[list[float]] | None = None,
    slice_thickness: float | None = None,
    spacing_between_slices: float | None = None,
) -> str | None:
    """Why a DICOM object's geometry cannot be used (the case fails `bad_geometry`), or None.

    Absent attributes are not problems (a 2D image need not be positioned); present ones must be
    finite, the orientation two orthonormal direction cosines, the pixel spacing positive, the slice
    thickness and spacing finite (zero or negative ones are ignored, as before: they only stand in
    when positions cannot give the slice spacing). Checked when grouping, so that headers the archive
    index cached under an earlier release are judged too.
    """
    if position is not None and not _finite(position):
        return f"ImagePositionPatient {position} is not finite"
    if frame_positions is not None and not all(_finite(p) for p in frame_positions):
        return "a frame's ImagePositionPatient is not finite"
    if orientation is not None:
        if not _finite(orientation):
            return f"ImageOrientationPatient {orientation} is not finite"
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        norms = np.linalg.norm(row), np.linalg.norm(col)
        if min(norms) < COSINE_TOLERANCE:
            return f"ImageOrientationPatient {orientation} has a zero direction vector"
        if max(abs(n - 1.0) for n in norms) > COSINE_TOLERANCE or abs(float(row @ col)) > COSINE_TOLERANCE:
            return f"ImageOrientationPatient {orientation} is not two orthonormal direction cosines"
    if pixel_spacing is not None and (not _finite(pixel_spacing) or min(pixel_spacing) <= 0):
        return f"PixelSpacing {pixel_spacing} is not positive and finite"
    for name, value in (("SliceThickness", slice_thickness), ("SpacingBetweenSlices", spacing_between_slices)):
        if value is not None and not np.isfinite(value):
            return f"{name} {value} is not finite"
    return None


def positive(value: float | None) -> float | None:
    """A slice thickness or spacing worth using: finite and > 0, else None."""
    return value if value is not None and np.isfinite(value) and value > 0 else None


def check_affine(affine: np.ndarray, *, name: str, what: str = "the affine") -> None:
    """CaseError(bad_geometry) unless the 4x4 affine is finite and spans three dimensions: masks must
    be written in a geometry a reader can use."""
    if not np.all(np.isfinite(affine)):
        raise CaseError(f"{name}: {what} holds NaN or infinite values", code=ErrorCode.BAD_GEOMETRY)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    directions = affine[:3, :3] / np.where(sizes > 0, sizes, 1.0)
    sizes_text = [float(f"{v:.6g}") for v in sizes]
    if not np.all((sizes >= MIN_VOXEL_MM) & (sizes <= MAX_VOXEL_MM)):
        raise CaseError(f"{name}: {what} has voxel sizes {sizes_text} mm, outside "
                        f"{MIN_VOXEL_MM:g}..{MAX_VOXEL_MM:g} mm", code=ErrorCode.BAD_GEOMETRY)  # fmt: skip
    if abs(np.linalg.det(directions)) < COLLAPSED_AXES:
        raise CaseError(f"{name}: {what} has collapsed axes (two of its directions nearly coincide)",
                        code=ErrorCode.BAD_GEOMETRY)  # fmt: skip


def slice_normal(orientation: list[float]) -> np.ndarray:
    """Unit normal (row x column cosines), LPS."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {orientation}")
    return n / norm


@dataclass
class SliceLayout:
    """How a stack of positioned slices maps onto a regular k axis."""

    order: list[int]  # input indices sorted along the normal
    k_index: list[int]  # k of each sorted slice (gaps leave holes)
    n_slices: int  # K, including filled gaps
    step_lps: np.ndarray  # world step per k, LPS mm
    origin_lps: np.ndarray  # position of k = 0
    warnings: list[str] = field(default_factory=list)


def layout_slices(
    positions: list[list[float]], orientation: list[float], *, fallback_spacing: float, name: str
) -> SliceLayout:
    """Order slices along the normal (not InstanceNumber), find gaps and duplicate positions.

    Gaps that are whole multiples of the nominal spacing become empty k positions so that the
    affine stays exact; irregular spacing or duplicate positions raise CaseError.
    """
    pos = np.asarray(positions, float)
    normal = slice_normal(orientation)
    d = pos @ normal
    order = sorted(range(len(d)), key=lambda i: (d[i], i))
    d_sorted = d[order]
    if len(order) == 1:
        return SliceLayout(order, [0], 1, normal * fallback_spacing, pos[0])

    gaps = np.diff(d_sorted)
    dup = np.nonzero(gaps < POSITION_TOLERANCE_MM)[0]
    if dup.size:
        where = ", ".join(f"{d_sorted[i]:.3f}" for i in dup[:5])
        raise CaseError(
            f"{name}: {dup.size} duplicate slice position(s) along the normal at {where} mm",
            code=ErrorCode.DUPLICATE_POSITION,
        )
    nominal = float(np.median(gaps))
    multiples = gaps / nominal
    if np.any(np.abs(multiples - np.round(multiples)) > SPACING_TOLERANCE) or np.any(np.round(multiples) < 1):
        nominal = float(gaps.min())
        multiples = gaps / nominal
        if np.any(np.abs(multiples - np.round(multiples)) > SPACING_TOLERANCE):
            raise CaseError(
                f"{name}: irregular slice spacing (gaps {np.round(gaps, 3).tolist()[:8]} mm)",
                code=ErrorCode.INCONSISTENT_SERIES,
            )
    steps = np.round(multiples).astype(int)
    k_index = [0, *np.cumsum(steps).tolist()]
    n_slices = k_index[-1] + 1
    step = (pos[order[-1]] - pos[order[0]]) / k_index[-1]
    warnings = []
    missing = n_slices - len(order)
    if missing > len(order):
        raise CaseError(
            f"{name}: sparse series: {len(order)} slices spread over {n_slices} positions of {nominal:.3f} mm",
            code=ErrorCode.INCONSISTENT_SERIES,
        )
    if missing:
        warnings.append(f"gap: {missing} missing slice(s) filled with empty slices (spacing {nominal:.3f} mm)")
    return SliceLayout(order, [int(k) for k in k_index], int(n_slices), step, pos[order[0]], warnings)


def affine_from_dicom(
    orientation: list[float] | None,
    pixel_spacing: list[float] | None,
    origin_lps: np.ndarray | list[float] | None,
    step_lps: np.ndarray | None,
    *,
    slice_spacing: float = 1.0,
) -> np.ndarray:
    """4x4 RAS affine for the NIfTI-ordered array (i = column, j = row, k = slice).

    Missing orientation means an unrotated image (rows along +x, columns along +y, LPS); missing
    spacing means 1 mm pixels; missing origin means 0.
    """
    orient = orientation or [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    row, col = np.asarray(orient[:3], float), np.asarray(orient[3:], float)
    dy, dx = pixel_spacing or (1.0, 1.0)  # PixelSpacing = [between rows, between columns]
    lps = np.eye(4)
    lps[:3, 0] = row * dx
    lps[:3, 1] = col * dy
    lps[:3, 2] = step_lps if step_lps is not None else slice_normal(orient) * slice_spacing
    lps[:3, 3] = np.asarray(origin_lps if origin_lps is not None else (0.0, 0.0, 0.0), float)
    return LPS_TO_RAS @ lps
