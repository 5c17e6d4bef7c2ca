"""Overlay thumbnails: the slice the models saw, with the mask contour.

The image comes from `stages.load.load_chunk` with the job's own config (slice axis, window; from
OUT/runs/<run_id>.json), so a thumbnail shows the plane, orientation and window the models were given;
the mask is read from its NIfTI file and put in the same display grid (`io.display.to_display`).
Volumes give two slices (largest mask area, middle), 2D images their one slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from mcs_batch.config import JobConfig
from mcs_batch.io.display import to_display
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.io.volume import plane
from mcs_batch.outputs.qc import mask_contour
from mcs_batch.outputs.reader import read_mask, record_of
from mcs_batch.records import slice_axis_for
from mcs_batch.stages.load import load_chunk

THUMB_SIDE = 192  # px: the longer side of every thumbnail (smaller images are enlarged, larger reduced)
CONTOUR_RGB = (0, 255, 0)


@dataclass(frozen=True)
class SliceView:
    """One slice of a case as the models saw it. image: uint8 RGB [H, W, 3]; mask: bool [H, W], same frame."""

    label: str  # "image" (2D), "largest mask area", "middle slice"
    slice_index: int
    image: np.ndarray
    mask: np.ndarray


def slices_to_show(mask_display: np.ndarray, axis: int) -> list[tuple[str, int]]:
    """(label, k) of the slices to show of a display-grid mask [I, J, K] sliced along `axis`: the one
    slice of a 2D image; else the slice of largest mask area (when the mask is not empty) and the middle."""
    n = mask_display.shape[axis]
    if n == 1:
        return [("image", 0)]
    areas = mask_display.sum(axis=tuple(a for a in range(3) if a != axis))
    middle = ("middle slice", n // 2)
    if not areas.any():
        return [middle]
    largest = int(np.argmax(areas))
    return [("largest mask area", largest)] + ([middle] if largest != n // 2 else [])


def case_views(row: dict, job: JobConfig, *, storage: StorageOptions | None) -> list[SliceView]:
    """The slices to show of a catalog cases row (DETAIL_COLUMNS) with its mask. Raises CaseError,
    OSError or ValueError when the source or the mask cannot be read."""
    if not row.get("mask_uri"):
        raise ValueError(f"{row['case_id']}: its row names no mask file")
    record = record_of(row)
    axis = slice_axis_for(record, job.slice_axis)
    mask = to_display(read_mask(row["mask_uri"], storage), record) > 0
    fs = filesystem_for(record.source_uris[0], storage)[0]
    cache: dict = {}
    views = []
    for label, k in slices_to_show(mask, axis):
        (image,) = load_chunk(record, k, k + 1, job, fs=fs, cache=cache)
        views.append(SliceView(label, k, image, plane(mask, k, axis)))
    return views


def thumbnail_size(height: int, width: int, side: int = THUMB_SIDE) -> tuple[int, int]:
    """(h, w) of the thumbnail of an [height, width] image: the longer side becomes `side`."""
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def thumbnail(image: np.ndarray, mask: np.ndarray, *, side: int = THUMB_SIDE) -> np.ndarray:
    """uint8 RGB [h, w, 3] (`thumbnail_size`): the image resized (bilinear), the mask resized
    (nearest) and its contour drawn one pixel wide, so that it stays visible at any scale."""
    h, w = thumbnail_size(*image.shape[:2], side)
    picture = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BILINEAR))
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
    picture = picture.copy()
    picture[mask_contour(small)] = CONTOUR_RGB
    return picture
