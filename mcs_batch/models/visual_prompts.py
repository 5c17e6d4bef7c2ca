"""Visual prompts for SAM from a saliency map (METHOD.md steps 4-5): coarse mask, components, boxes, points.

Every function is pure numpy / scipy on arrays in the image frame (row = y, column = x, pixel indices).

Conventions, matched to the public MedCLIP-SAMv2 reference (postprocess_saliency_maps.py, prompt_sam.py):
- coarse mask: foreground = the pixels of the k-means cluster with the higher centre (or Otsu / fixed
  threshold), then the K largest 8-connected components (cv2.connectedComponentsWithStats' default);
- boxes XYXY in pixels, x0 / y0 = first column / row, x1 / y1 = last column / row + 1, then clipped to
  W - 1 / H - 1 (what the reference's cv2.boundingRect -> (x, y, x + w, y + h) -> min(.., W - 1) feeds
  SAM; so a component touching the right or bottom border ends at its last index there);
- points (x, y): integer pixel indices of mask pixels, as float32.

Where we differ from the reference, on purpose:
- k-means is Lloyd's algorithm on the pixel values started from (min, max) and run to convergence, not
  scikit-learn's k-means++ (random_state=10) on a 256x256 nearest-neighbour resample: deterministic and
  resolution-independent. On bimodal maps both give the same mask; on maps without two clear modes the
  reference's early-stopped k-means can differ by about 1% of the pixels.
- K largest components keeps exactly K on ties of size (larger first, then the first in raster order);
  the reference keeps every component whose size equals one of the K largest sizes.
- an empty coarse mask or a constant map gives an empty result with reason EMPTY_SALIENCY (the reference
  crashes); points are sampled with a seeded generator (the reference's are not reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from scipy import ndimage

from mcs_batch.errors import CaseError, ConfigError, ErrorCode

_KMEANS_MAX_ITERATIONS = 300  # Lloyd in 1D converges in a handful of steps; this only bounds a bug


class CoarseMethod(StrEnum):
    """How the saliency map is split into foreground / background."""

    KMEANS = "kmeans"  # 2-means on pixel values, foreground = higher centre (the reference's default)
    OTSU = "otsu"  # skimage.filters.threshold_otsu (256-bin histogram), foreground = value > t
    THRESHOLD = "threshold"  # foreground = value > threshold (the reference's "thresholding")


class BoxMode(StrEnum):
    """One box around all kept components, or one box per component (the reference's --multicontour)."""

    UNION = "union"
    PER_COMPONENT = "per_component"


@dataclass(frozen=True)
class PromptSettings:
    """How a saliency map becomes SAM prompts. Strings are accepted and converted to the enums once."""

    method: CoarseMethod = CoarseMethod.KMEANS  # see CoarseMethod
    threshold: float = 0.3  # only for method "threshold" (the reference's default 0.3)
    k_components: int = 1  # K largest connected components kept (2 for paired organs, e.g. lungs)
    box_mode: BoxMode = BoxMode.UNION  # see BoxMode
    n_points: int = 0  # positive points sampled from the coarse mask (0: boxes only)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", CoarseMethod(self.method))
            object.__setattr__(self, "box_mode", BoxMode(self.box_mode))
        except ValueError as e:
            raise ConfigError(f"prompt settings: {e}") from e
        if int(self.k_components) < 1:
            raise ConfigError(f"prompt settings: k_components must be >= 1, got {self.k_components}")
        if int(self.n_points) < 0:
            raise ConfigError(f"prompt settings: n_points must be >= 0, got {self.n_points}")
        if not np.isfinite(self.threshold):
            raise ConfigError(f"prompt settings: threshold must be finite, got {self.threshold}")


@dataclass(frozen=True)
class VisualPrompts:
    """SAM prompts for one image, in its own pixel frame.

    coarse_mask: bool [H, W], the coarse mask after keeping the K largest components.
    boxes_xyxy: float32 [N, 4] (see the module docstring for the convention); N = 0 when empty.
    points_xy: float32 [P, 2] (x, y) positive points; P = 0 when none were asked for or when empty.
    n_components: number of connected components in coarse_mask (the reference keeps this many
        components of SAM's output; pass it as SamSegmenter.segment's k_components to do the same).
    reason: ErrorCode.EMPTY_SALIENCY when there is nothing to prompt with, else None.
    """

    coarse_mask: np.ndarray
    boxes_xyxy: np.ndarray
    points_xy: np.ndarray
    n_components: int = 0
    reason: ErrorCode | None = field(default=None)

    @property
    def is_empty(self) -> bool:
        return self.reason is not None


def _structure(connectivity: int) -> np.ndarray:
    if connectivity == 8:
        return np.ones((3, 3), dtype=bool)
    if connectivity == 4:
        return ndimage.generate_binary_structure(2, 1)
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def _check_saliency(saliency: np.ndarray) -> np.ndarray:
    saliency = np.asarray(saliency)
    if saliency.ndim != 2 or saliency.size == 0:
        raise ValueError(f"saliency must be a non-empty 2D array [H, W], got shape {saliency.shape}")
    if not np.issubdtype(saliency.dtype, np.floating):
        raise ValueError(f"saliency must be floating point in [0, 1], got dtype {saliency.dtype}")
    if not np.isfinite(saliency).all():
        raise CaseError("saliency map has NaN or infinite values", code=ErrorCode.MODEL_ERROR)
    return saliency


def _kmeans_threshold(values: np.ndarray) -> float:
    """Lloyd's 2-means on 1D values from centres (min, max), run until the assignment is stable.

    Returns the decision threshold (c_low + c_high) / 2: a value is in the higher cluster iff > it.
    Requires max > min; neither cluster can become empty (each centre stays strictly on its side).
    """
    low, high = float(values.min()), float(values.max())
    foreground = None
    for _ in range(_KMEANS_MAX_ITERATIONS):
        threshold = 0.5 * (low + high)
        assignment = values > threshold
        if foreground is not None and np.array_equal(assignment, foreground):
            return threshold
        foreground = assignment
        low, high = float(values[~foreground].mean()), float(values[foreground].mean())
    return 0.5 * (low + high)


def coarse_mask(saliency: np.ndarray, *, method: CoarseMethod | str = "kmeans", threshold: float = 0.3) -> np.ndarray:
    """Foreground of a saliency map: bool [H, W].

    saliency: float [H, W] in [0, 1], image frame. method: "kmeans" (2 clusters on the pixel values,
    foreground = the higher cluster), "otsu" or "threshold" (value > threshold). A constant map has no
    two clusters: k-means and Otsu return an all-False mask for it.
    """
    saliency = _check_saliency(saliency)
    method = CoarseMethod(method)
    if method is CoarseMethod.THRESHOLD:
        return saliency > threshold
    values = saliency.astype(np.float64, copy=False)
    if values.max() <= values.min():
        return np.zeros(saliency.shape, dtype=bool)
    if method is CoarseMethod.OTSU:
        from skimage.filters import threshold_otsu

        return values > threshold_otsu(values)
    return values > _kmeans_threshold(values.ravel())


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels int32 [H, W] (0 = background, 1.. in raster order of first pixel) and sizes [n + 1]."""
    labels, n = ndimage.label(mask, structure=_structure(connectivity))
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _order_by_size(sizes: np.ndarray) -> np.ndarray:
    """Component labels 1..n by size, largest first; equal sizes in label (raster) order."""
    labels = np.arange(1, len(sizes))
    return labels[np.lexsort((labels, -sizes[1:]))]


def largest_components(mask: np.ndarray, k: int, *, connectivity: int = 8) -> np.ndarray:
    """The K largest connected components of a bool [H, W] mask, as a bool [H, W] mask.

    Ties of size are broken by position: the component whose first pixel comes first in raster order
    (row by row, top to bottom) wins. K >= the number of components returns the mask unchanged.
    """
    mask = np.asarray(mask, dtype=bool)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels, sizes = _components(mask, connectivity)
    keep = np.zeros(len(sizes), dtype=bool)
    keep[_order_by_size(sizes)[:k]] = True
    return keep[labels]


def _box(rows: slice, cols: slice, height: int, width: int) -> list[float]:
    return [cols.start, rows.start, min(cols.stop, width - 1), min(rows.stop, height - 1)]


def boxes_from_components(mask: np.ndarray, *, mode: BoxMode | str = "union", connectivity: int = 8) -> np.ndarray:
    """Boxes around the foreground of a bool [H, W] mask: float32 [N, 4] XYXY pixel coordinates.

    x0, y0 = first foreground column, row; x1, y1 = last column, row + 1, clipped to W - 1, H - 1
    (the reference's convention, see the module docstring). mode "union": one box around all foreground
    (N = 1). mode "per_component": one box per connected component that is not inside a hole of another
    one (as the reference's external contours), ordered by component size, largest first, then by the
    raster position of its first pixel. An empty mask gives N = 0.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D [H, W], got shape {mask.shape}")
    height, width = mask.shape
    if not mask.any():
        return np.zeros((0, 4), dtype=np.float32)
    mode = BoxMode(mode)
    if mode is BoxMode.UNION:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        box = _box(slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), height, width)
        return np.asarray([box], dtype=np.float32)
    # Filling holes merges a component nested in another's hole into its outer one; the background is
    # flooded with the complementary connectivity (4 for 8-connected foreground and vice versa).
    background = _structure(4 if connectivity == 8 else 8)
    outer = ndimage.binary_fill_holes(mask, structure=background)
    labels, _ = _components(outer, connectivity)
    sizes = np.bincount(labels[mask], minlength=labels.max() + 1)  # own pixels, holes not counted
    extents = ndimage.find_objects(labels)
    boxes = [_box(*extents[label - 1], height, width) for label in _order_by_size(sizes)]
    return np.asarray(boxes, dtype=np.float32)


def sample_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n distinct positive points from a bool [H, W] mask: float32 [min(n, pixels), 2] as (x, y).

    Points are pixel indices drawn without replacement by `rng.choice` from the mask's pixels listed
    column by column (x, then y), as the reference lists them. Same generator state -> same points.
    """
    mask = np.asarray(mask, dtype=bool)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    candidates = np.argwhere(mask.T)  # (x, y), sorted by x then y
    if n == 0 or len(candidates) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    chosen = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
    return candidates[chosen].astype(np.float32)


def _empty(shape: tuple[int, ...]) -> VisualPrompts:
    return VisualPrompts(
        coarse_mask=np.zeros(shape, dtype=bool),
        boxes_xyxy=np.zeros((0, 4), dtype=np.float32),
        points_xy=np.zeros((0, 2), dtype=np.float32),
        n_components=0,
        reason=ErrorCode.EMPTY_SALIENCY,
    )


def visual_prompts(
    saliency: np.ndarray, settings: PromptSettings, rng: np.random.Generator | None = None
) -> VisualPrompts:
    """Coarse mask, boxes and points for one saliency map (float [H, W] in [0, 1], image frame).

    rng is needed when settings.n_points > 0: pass a per-case generator
    (mcs_batch.seeding.case_rng). A constant map or an empty coarse mask gives an empty VisualPrompts
    with reason EMPTY_SALIENCY, never an exception.
    """
    saliency = _check_saliency(saliency)
    if settings.n_points > 0 and rng is None:
        raise ValueError("visual_prompts: n_points > 0 needs a seeded rng (mcs_batch.seeding.case_rng)")
    if saliency.max() <= saliency.min():
        return _empty(saliency.shape)
    coarse = coarse_mask(saliency, method=settings.method, threshold=settings.threshold)
    kept = largest_components(coarse, settings.k_components)
    if not kept.any():
        return _empty(saliency.shape)
    points = sample_points(kept, settings.n_points, rng) if settings.n_points > 0 else None
    return VisualPrompts(
        coarse_mask=kept,
        boxes_xyxy=boxes_from_components(kept, mode=settings.box_mode),
        points_xy=points if points is not None else np.zeros((0, 2), dtype=np.float32),
        n_components=int(ndimage.label(kept, structure=_structure(8))[1]),
        reason=None,
    )
