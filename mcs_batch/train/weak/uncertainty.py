"""From the ensemble's probability maps to a mask and uncertainty scores (pure numpy).

probs: float32 [M, H, W] in [0, 1], the foreground probability of each of M checkpoints, image frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_EPS = 1e-6


@dataclass(frozen=True)
class SliceScores:
    mask: np.ndarray  # bool [H, W]: mean probability > threshold
    mean_probability: np.ndarray  # float32 [H, W]
    entropy_sum: float  # summed binary entropy (bits) of the mean probability
    boundary_pixels: int  # pixels on the mask's boundary
    spread: float  # mean over the mask (or the image when empty) of the std across checkpoints


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of Bernoulli(p), elementwise; 0 at p in {0, 1}."""
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def boundary_length(mask: np.ndarray) -> int:
    """Pixels of the mask that touch the background (4-neighbourhood); 0 for an empty mask."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0
    return int(np.count_nonzero(mask & ~ndimage.binary_erosion(mask, border_value=0)))


def score_slice(probs: np.ndarray, threshold: float) -> SliceScores:
    probs = np.asarray(probs, np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [M, H, W], got {probs.shape}")
    mean = probs.mean(axis=0)
    mask = mean > threshold
    std = probs.std(axis=0)
    region = mask if mask.any() else np.ones_like(mask)
    return SliceScores(
        mask=mask,
        mean_probability=mean,
        entropy_sum=float(binary_entropy(mean).sum()),
        boundary_pixels=boundary_length(mask),
        spread=float(std[region].mean()),
    )


def case_uncertainty(slices: list[SliceScores]) -> dict:
    """Per-case scores over its slices.

    uncertainty: the mean probability's summed entropy divided by the mask's boundary length (METHOD.md):
        a clean mask has entropy only along its edge (about 1 per boundary pixel); more means doubt
        inside or outside the mask. An empty prediction divides by 1.
    spread: mean std across checkpoints over the mask (checkpoints disagreeing).
    """
    if not slices:
        return {"uncertainty": None, "uncertainty_spread": None}
    entropy = sum(s.entropy_sum for s in slices)
    boundary = sum(s.boundary_pixels for s in slices)
    return {
        "uncertainty": float(entropy / max(boundary, 1)),
        "uncertainty_spread": float(np.mean([s.spread for s in slices])),
    }
