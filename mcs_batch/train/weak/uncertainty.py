"""From the ensemble's probability maps to a mask and uncertainty scores (pure numpy).

probs: float32 [M, H, W] in [0, 1], the foreground probability of each of M checkpoints, image frame.

The ensemble predictor never holds the M maps of a slice (nor the M members) at once: it adds each
member's map to a `SliceMoments` (a running mean and sum of squared deviations, Welford, float64) and
`score_moments` gives the same scores as `score_slice` on the stacked maps (within float32 rounding).
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


class SliceMoments:
    """Mean and standard deviation across members of one slice's probability maps, one map at a time.

    add(p): p float32 [H, W] in [0, 1] (or a whole volume's [I, J, K], 3d_fullres); memory is two
    float64 arrays of that shape whatever the member count.
    """

    def __init__(self):
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of squared deviations from the running mean

    def add(self, probability: np.ndarray) -> None:
        p = np.asarray(probability, np.float64)
        if p.ndim not in (2, 3) or (self._mean is not None and p.shape != self._mean.shape):
            raise ValueError(f"a member's map must be [H, W] like the others (or [I, J, K]: volumes), got {p.shape}")
        self.count += 1
        if self._mean is None:
            self._mean, self._m2 = p.copy(), np.zeros_like(p)
            return
        delta = p - self._mean
        self._mean += delta / self.count
        self._m2 += delta * (p - self._mean)

    @property
    def mean(self) -> np.ndarray:
        """float32 [H, W]: the mean probability over the members added."""
        self._check()
        return self._mean.astype(np.float32)

    @property
    def std(self) -> np.ndarray:
        """float32 [H, W]: the population standard deviation (ddof 0, as np.std) over the members."""
        self._check()
        return np.sqrt(np.maximum(self._m2, 0.0) / self.count).astype(np.float32)

    def _check(self) -> None:
        if not self.count:
            raise ValueError("no member's map was added")


def score_moments(moments: SliceMoments, threshold: float) -> SliceScores:
    """The scores of `score_slice` from the members' running moments."""
    return _scores(moments.mean, moments.std, threshold)


def score_mean_std(mean: np.ndarray, std: np.ndarray, threshold: float) -> SliceScores:
    """The scores of one slice from its members' mean and std maps (float32 [H, W]): a slice of a
    volume's moments (3d_fullres)."""
    return _scores(np.asarray(mean, np.float32), np.asarray(std, np.float32), threshold)


def score_slice(probs: np.ndarray, threshold: float) -> SliceScores:
    probs = np.asarray(probs, np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [M, H, W], got {probs.shape}")
    return _scores(probs.mean(axis=0), probs.std(axis=0), threshold)


def _scores(mean: np.ndarray, std: np.ndarray, threshold: float) -> SliceScores:
    mask = mean > threshold
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
