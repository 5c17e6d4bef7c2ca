"""QC pictures a person can look at: image, saliency heat map, prompt boxes and the mask contour."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

TINY_NOTICE = "TINY RANDOM MODELS: this mask is meaningless"


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: mask pixels with a 4-neighbour outside the mask."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def overlay(
    image: np.ndarray,
    saliency: np.ndarray | None,
    boxes_xyxy: np.ndarray,
    mask: np.ndarray,
    *,
    title: str = "",
    tiny: bool = False,
    heat_alpha: float = 0.45,
) -> np.ndarray:
    """uint8 RGB [H, W(+W), 3]: left the image with the mask contour (green) and boxes (yellow);
    right the saliency heat map over the image. All inputs in the image's own frame."""
    base = image.astype(np.float32)
    left = base.copy()
    left[mask_contour(mask)] = (0, 255, 0)
    panels = [left]
    if saliency is not None:
        heat = colormaps["jet"](np.clip(saliency, 0, 1))[..., :3] * 255.0
        panels.append((1 - heat_alpha) * base + heat_alpha * heat)
    picture = Image.fromarray(np.clip(np.concatenate(panels, axis=1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for x0, y0, x1, y1 in np.asarray(boxes_xyxy, float).reshape(-1, 4):
        draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 0), width=max(1, image.shape[1] // 200))
    size = max(12, image.shape[1] // 40)
    font = ImageFont.load_default(size=size)
    lines = [t for t in (title, TINY_NOTICE if tiny else "") if t]
    for n, line in enumerate(lines):
        colour = (255, 64, 64) if line == TINY_NOTICE else (255, 255, 255)
        draw.text((4, 4 + (size + 4) * n), line, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(picture)
