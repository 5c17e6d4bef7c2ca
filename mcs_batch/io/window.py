"""Modality-aware conversion of a slice to model input: uint8 RGB [H, W, 3].

8-bit greyscale without physical units (PNG/JPEG modes L, LA and 1; 8-bit MONOCHROME2 DICOM with no
rescale, not CT; uint8 NIfTI without scaling): the stored values, replicated to RGB, as the
reference code feeds its images (the reader marks the volume `meta["as_stored"]`). CT: a window
preset in Hounsfield units (level, width). MR, US, X-ray and anything else of more than 8 bits (16-bit
PNG, 12/16-bit DICOM, float NIfTI): percentile clipping of the slice's own values. Colour images pass
through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from mcs_batch.errors import ConfigError


class CTWindow(StrEnum):
    LUNG = "lung"
    MEDIASTINUM = "mediastinum"
    BRAIN = "brain"
    BONE = "bone"
    ABDOMEN = "abdomen"


# (level, width) in HU, the usual radiology presets.
CT_WINDOWS: dict[CTWindow, tuple[float, float]] = {
    CTWindow.LUNG: (-600.0, 1500.0),
    CTWindow.MEDIASTINUM: (40.0, 400.0),
    CTWindow.BRAIN: (40.0, 80.0),
    CTWindow.BONE: (400.0, 1800.0),
    CTWindow.ABDOMEN: (50.0, 350.0),
}


@dataclass(frozen=True)
class WindowSettings:
    ct_window: CTWindow = CTWindow.MEDIASTINUM  # preset for CT
    ct_level_width: tuple[float, float] | None = None  # explicit (level, width) overrides the preset
    percentiles: tuple[float, float] = (0.5, 99.5)  # clipping for MR, US, X-ray, 16-bit PNG, ...

    def __post_init__(self):
        try:
            object.__setattr__(self, "ct_window", CTWindow(self.ct_window))
        except ValueError as e:
            choices = ", ".join(w.value for w in CTWindow)
            raise ConfigError(f"unknown CT window {self.ct_window!r} (choose from {choices})") from e
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")


def window_level(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Linear window: level - width/2 -> 0, level + width/2 -> 255; float32 in [0, 255]."""
    lo = level - width / 2.0
    return np.clip((values.astype(np.float32) - lo) * (255.0 / width), 0.0, 255.0)


def percentile_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to the [low, high] percentiles and stretch to [0, 255]; a constant image gives zeros."""
    v = values.astype(np.float32)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return np.zeros_like(v)
    lo, hi = np.percentile(finite, [low, high])
    if hi <= lo:
        return np.zeros_like(v)
    return np.clip((v - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def to_model_rgb(
    image: np.ndarray, *, modality: str, settings: WindowSettings | None = None, as_stored: bool = False
) -> np.ndarray:
    """A 2D slice (float [H, W] physical units, or uint8 [H, W, 3]) -> uint8 RGB [H, W, 3].

    as_stored: the slice holds 8-bit values (0..255) that reach the models unchanged (no window).
    """
    settings = settings or WindowSettings()
    if image.ndim == 3:
        if image.shape[2] != 3:
            raise ValueError(f"expected [H, W] or [H, W, 3], got {image.shape}")
        return image.astype(np.uint8, copy=False)
    if as_stored:
        scaled = np.clip(image, 0.0, 255.0)
    elif modality.upper() == "CT":
        level, width = settings.ct_level_width or CT_WINDOWS[CTWindow(settings.ct_window)]
        scaled = window_level(image, level, width)
    else:
        scaled = percentile_window(image, *settings.percentiles)
    gray = np.rint(np.nan_to_num(scaled, nan=0.0)).astype(np.uint8)  # NaN voxels (float NIfTI): darkest
    return np.repeat(gray[:, :, None], 3, axis=2)
