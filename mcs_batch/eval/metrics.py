"""Segmentation quality: Dice, normalised surface Dice (NSD) and the 95th-percentile Hausdorff distance.

Pure functions on label arrays of any dimension (2D images, 3D volumes). A mask is `array > 0` (bool or
integer labels; select one label before calling when a label map has several). `spacing` is the size of
a pixel / voxel along each axis (mm where the geometry is known); None means 1 along every axis, so
distances and tolerances are then in pixels.

Definitions (the ones MONAI and DeepMind's surface-distance use, with voxel boundaries):
- boundary of a mask: its foreground voxels with at least one face neighbour (4-connectivity in 2D,
  6 in 3D) in the background; outside the array counts as background, so a mask touching the edge of
  the array has a boundary there (a full mask's boundary is the array's outer ring).
- d(a, B): Euclidean distance from the centre of boundary voxel a to the nearest boundary voxel centre
  of the other mask, in units of `spacing`.
- Dice = 2 |P & T| / (|P| + |T|).
- NSD at tolerance tau = (#{p in dP: d(p, dT) <= tau} + #{t in dT: d(t, dP) <= tau}) / (|dP| + |dT|):
  the fraction of both boundaries lying within tau of the other (every boundary voxel weighs the same).
  A relative slack of 1e-6 absorbs floating-point error at exactly tau (a 2-pixel shift at tau = 2).
- HD95 = max(P95{d(p, dT)}, P95{d(t, dP)}), numpy's linear-interpolation percentile of each direction.

Empty masks (conventions; nothing is dropped from means):
- both empty: Dice 1, NSD 1, HD95 0 (perfect agreement: nothing to find and nothing found);
- exactly one empty: Dice 0, NSD 0, HD95 = the diagonal of the array's extent, norm(shape * spacing),
  a finite worst case larger than any distance inside the image (BraTS does the same with a fixed
  penalty), so that a missed or hallucinated structure weighs as the worst possible result.

The reference evaluation (MedCLIP-SAMv2's evaluation/eval.py, through DeepMind's code) passes each 2D
mask as a one-slice 3D volume; its surface then includes the slice's top and bottom faces, i.e. the
whole mask area, which makes its NSD on 2D images closer to a region overlap. Ours is the 2D boundary
NSD (what MONAI and the surface-distance paper define); expect it to be lower on the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

TOLERANCE_SLACK = 1e-6  # relative: d <= tau * (1 + slack) counts as within tau


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one case. dice, nsd in [0, 1]; hd95 in the units of `spacing` (mm or pixels)."""

    dice: float
    nsd: float
    hd95: float
    truth_voxels: int
    pred_voxels: int


def _masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if pred.ndim < 1:
        raise ValueError("masks must have at least one dimension")
    return pred, truth


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    values = np.asarray(spacing, dtype=float).reshape(-1)
    if values.shape != (ndim,):
        raise ValueError(f"spacing {tuple(values)} must have one value per axis ({ndim})")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing {tuple(values)} must be positive and finite")
    return values


def extent_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """norm(shape * spacing): the HD95 given to a case where exactly one of the masks is empty."""
    return float(np.linalg.norm(np.asarray(shape, float) * _spacing(spacing, len(shape))))


def boundary(mask: np.ndarray) -> np.ndarray:
    """bool, same shape: foreground voxels with a face neighbour in the background (outside included)."""
    mask = np.asarray(mask) > 0
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2 |P & T| / (|P| + |T|); 1.0 when both are empty."""
    pred, truth = _masks(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(d(p, dT) for every boundary voxel p of pred, d(t, dP) for every boundary voxel t of truth),
    float64 in the units of `spacing`. Both masks must be non-empty.

    Computed on the bounding box of the two masks (padded by one voxel), where every boundary voxel
    lies, so the distances are exact and the cost scales with the structure, not the image.
    """
    pred, truth = _masks(pred, truth)
    step = _spacing(spacing, pred.ndim)
    if not pred.any() or not truth.any():
        raise ValueError("surface distances need two non-empty masks")
    coords = np.nonzero(pred | truth)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    # Pad with background: the array's edge stays a boundary, exactly as in the uncropped array.
    bp, bt = boundary(np.pad(pred[box], 1)), boundary(np.pad(truth[box], 1))
    to_truth = ndimage.distance_transform_edt(~bt, sampling=step)
    to_pred = ndimage.distance_transform_edt(~bp, sampling=step)
    return to_truth[bp].astype(np.float64), to_pred[bt].astype(np.float64)


def surface_dice(
    pred: np.ndarray, truth: np.ndarray, *, tolerance: float = 2.0, spacing: Sequence[float] | None = None
) -> float:
    """NSD at `tolerance` (units of `spacing`: mm, or pixels when spacing is None). 1.0 when both are
    empty, 0.0 when exactly one is."""
    return case_metrics(pred, truth, spacing=spacing, tolerance=tolerance).nsd


def hausdorff95(pred: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float] | None = None) -> float:
    """max of the two directed 95th percentiles of boundary distances (units of `spacing`).
    0.0 when both are empty; the extent diagonal (see module doc) when exactly one is."""
    return case_metrics(pred, truth, spacing=spacing).hd95


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float] | None = None, tolerance: float = 2.0
) -> CaseMetrics:
    """Dice, NSD and HD95 of one case, sharing one distance computation."""
    pred, truth = _masks(pred, truth)
    _spacing(spacing, pred.ndim)  # refuse a bad spacing whatever the masks hold
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if n_pred == 0 or n_truth == 0:
        both = n_pred == n_truth
        return CaseMetrics(
            dice=1.0 if both else 0.0,
            nsd=1.0 if both else 0.0,
            hd95=0.0 if both else extent_diagonal(pred.shape, spacing),
            truth_voxels=n_truth,
            pred_voxels=n_pred,
        )
    d_pred, d_truth = surface_distances(pred, truth, spacing=spacing)
    limit = tolerance * (1.0 + TOLERANCE_SLACK)
    within = int((d_pred <= limit).sum()) + int((d_truth <= limit).sum())
    return CaseMetrics(
        dice=2.0 * int(np.logical_and(pred, truth).sum()) / (n_pred + n_truth),
        nsd=within / (d_pred.size + d_truth.size),
        hd95=float(max(np.percentile(d_pred, 95), np.percentile(d_truth, 95))),
        truth_voxels=n_truth,
        pred_voxels=n_pred,
    )
