"""Hard synthetic data for bench/weak_bench.py: a target defined by shape and position, not intensity,
and pseudo-labels with systematic, SAM-like errors.

A scene (uint8 [S, S], grayscale): a body (textured, smooth random field + noise) holding
- the target ("kidney"): a lobed oval at a consistent position (left of centre, below the middle) with
  a thin tail (2 px wide) running down and to the left;
- its neighbour ("liver"): a larger lobed blob up and to the right, touching the target, separated
  from it only by a 1-2 px seam whose contrast varies from invisible to clear;
- a "vertebra" below the centre and 2-3 "bowel" blobs anywhere else in the body;
all five of the same intensity, so no threshold separates the target from the rest.

Pseudo-labels ("what SAM returned"), errors that do not average out:
- leak: where the seam is faint (contrast < leak_below), the mask runs into the neighbour, up to
  4-12 px past the seam;
- the thin tail is always missed;
- the lateral (left) boundary is always 1-3 px inside the truth;
- a fixed fraction of masks is empty (exactly round(empty_fraction * n) cases of each split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

BODY, OUTSIDE, ORGAN = 95.0, 15.0, 150.0  # mean intensities


@dataclass(frozen=True)
class PseudoErrors:
    """How a truth becomes a SAM-like pseudo-label (module docstring)."""

    leak_below: float = 0.5  # seam contrast under which the mask leaks into the neighbour
    leak_px: tuple[int, int] = (4, 12)  # how far past the seam, drawn per case
    lateral_px: tuple[int, int] = (1, 3)  # left boundary moved inward by this many pixels
    miss_tail: bool = True
    empty_fraction: float = 0.15


@dataclass
class Case:
    image: np.ndarray  # uint8 [S, S]
    truth: np.ndarray  # bool [S, S], the target
    neighbour: np.ndarray  # bool [S, S]
    tail: np.ndarray  # bool [S, S], the target's thin part
    seam_contrast: float  # 0: target and neighbour read as one blob; 1: a dark line between them
    pseudo: np.ndarray | None = None  # bool [S, S]
    error: str = ""  # "empty", "leak" or "bias" (tail missed and lateral side pulled in, no leak)


def lobed(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float,
          rng: np.random.Generator, wobble: float = 0.12) -> np.ndarray:  # fmt: skip
    """bool [S, S]: an ellipse whose radius varies with 2-4 random harmonics of the angle."""
    v, u, radius = _wobbled(yy - cy, xx - cx, ry, rx, angle, rng, wobble)
    return (v / ry) ** 2 + (u / rx) ** 2 <= radius**2


def _wobbled(dy: np.ndarray, dx: np.ndarray, ry: float, rx: float, angle: float, rng: np.random.Generator,
             wobble: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The offsets rotated by `angle` (v, u) and the outline's radius at each one's angle: 1 plus 2-4
    random harmonics (lobed, lobed3d)."""
    c, s = np.cos(angle), np.sin(angle)
    v, u = dy * c - dx * s, dy * s + dx * c
    theta = np.arctan2(v / ry, u / rx)
    radius = np.ones_like(theta)
    for k in range(2, 5):
        radius += wobble / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return v, u, radius


def make_case(rng: np.random.Generator, size: int = 96) -> Case:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    s = float(size)
    body = lobed(yy, xx, 0.5 * s, 0.5 * s, 0.45 * s, 0.47 * s, 0.0, rng, wobble=0.04)

    cy, cx = (0.56 + rng.uniform(-0.04, 0.04)) * s, (0.36 + rng.uniform(-0.04, 0.04)) * s
    ry, rx = rng.uniform(0.10, 0.13) * s, rng.uniform(0.07, 0.09) * s
    kidney = lobed(yy, xx, cy, cx, ry, rx, rng.uniform(-0.35, 0.35), rng)
    # the tail: a 2 px wide curve from the lower-left of the oval, down and to the left
    tail = np.zeros((size, size), bool)
    start = np.array([cy + 0.6 * ry, cx - 0.5 * rx])
    heading, length = rng.uniform(0.6, 1.1), rng.uniform(0.10, 0.16) * s  # radians from "down", px
    bend = rng.uniform(-0.02, 0.02)
    point = start.copy()
    for _ in range(int(length * 2)):
        point += 0.5 * np.array([np.cos(heading), -np.sin(heading)])
        heading += bend
        y, x = (int(v) for v in np.rint(point))
        if 0 <= y < size - 1 and 0 <= x < size - 1:
            tail[y : y + 2, x : x + 2] = True
    tail &= ~kidney
    truth = kidney | tail

    # the neighbour: up and to the right, overlapping the target, then carved away from it by the seam
    ny, nx = cy - 0.55 * ry - 0.10 * s, cx + 0.6 * rx + 0.12 * s
    liver = lobed(yy, xx, ny, nx, rng.uniform(0.16, 0.20) * s, rng.uniform(0.15, 0.19) * s, rng.uniform(-0.5, 0.5), rng)
    seam_px = int(rng.integers(1, 3))
    seam = ndimage.binary_dilation(truth, iterations=seam_px) & ~truth
    liver &= ~truth & ~seam & body
    vertebra = lobed(yy, xx, (0.82 + rng.uniform(-0.02, 0.02)) * s, (0.5 + rng.uniform(-0.03, 0.03)) * s,
                     0.07 * s, 0.08 * s, 0.0, rng, wobble=0.05)  # fmt: skip
    near_target = ndimage.binary_dilation(truth, iterations=4)
    bowel = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(2, 4))):
        for _try in range(20):
            blob = lobed(yy, xx, rng.uniform(0.2, 0.8) * s, rng.uniform(0.2, 0.8) * s, rng.uniform(0.03, 0.06) * s,
                         rng.uniform(0.03, 0.06) * s, rng.uniform(0, np.pi), rng)  # fmt: skip
            if not (blob & near_target).any() and (blob & body).sum() == blob.sum():
                bowel |= blob
                break

    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 3.0)
    image = np.where(body, BODY + 14.0 * field / field.std(), OUTSIDE)
    for structure in (liver, vertebra, bowel, truth):
        image = np.where(structure, ORGAN + rng.uniform(-6, 6), image)
    seam_contrast = float(rng.uniform(0, 1))
    image = np.where(seam & ~liver & body & ~truth, ORGAN - seam_contrast * (ORGAN - BODY + 20), image)
    image = ndimage.gaussian_filter(image, 0.7) + rng.normal(0, 12, (size, size))
    image = np.clip(image, 0, 255).astype(np.uint8)
    neighbour_touching = liver & ndimage.binary_dilation(truth, iterations=seam_px + 1)
    if not neighbour_touching.any():  # the neighbour always borders the target across the seam
        liver |= seam & body
    return Case(image=image, truth=truth, neighbour=liver, tail=tail, seam_contrast=seam_contrast)


def sam_like(case: Case, rng: np.random.Generator, errors: PseudoErrors, *, empty: bool) -> tuple[np.ndarray, str]:
    """(bool [S, S] pseudo-label, error kind) with the systematic errors of the module docstring."""
    if empty:
        return np.zeros_like(case.truth), "empty"
    mask, kind = case.truth.copy(), "bias"
    if case.seam_contrast < errors.leak_below:  # across the seam into the neighbour, nowhere else
        reach = int(rng.integers(errors.leak_px[0], errors.leak_px[1] + 1))
        seam = ndimage.binary_dilation(case.truth, iterations=3) & ~case.truth
        toward = seam & ndimage.binary_dilation(case.neighbour, iterations=3)
        mask |= ndimage.binary_dilation(case.truth, iterations=reach) & (case.neighbour | toward)
        mask = ndimage.binary_fill_holes(mask)
        kind = "leak"
    if errors.miss_tail:
        mask &= ~case.tail
    lateral = int(rng.integers(errors.lateral_px[0], errors.lateral_px[1] + 1))
    pulled = np.zeros_like(mask)
    pulled[:, lateral:] = mask[:, :-lateral]  # pixel kept only if the one `lateral` px to its left is in too
    mask &= pulled
    return mask, kind


def make_split(seed: int, n: int, *, size: int, errors: PseudoErrors) -> list[Case]:
    """n cases, each drawn from its own generator ([seed, i]); exactly round(empty_fraction * n) empty."""
    empty = set(np.random.default_rng([seed, 10**6]).permutation(n)[: round(errors.empty_fraction * n)].tolist())
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        case = make_case(rng, size)
        case.pseudo, case.error = sam_like(case, rng, errors, empty=i in empty)
        cases.append(case)
    return cases


def save_preview(cases: list[Case], path: Path, n: int = 8) -> None:
    """A strip of n cases: image over truth (red) and pseudo-label (green) outlines, for a quick look."""
    tiles = []
    for case in cases[:n]:
        rgb = np.repeat(case.image[:, :, None], 3, axis=2).copy()
        for mask, channel in ((case.truth, 0), (case.pseudo, 1)):
            edge = mask & ~ndimage.binary_erosion(mask)
            rgb[edge] = 0
            rgb[edge, channel] = 255
        tiles.append(np.concatenate([np.repeat(case.image[:, :, None], 3, axis=2), rgb], axis=0))
    Image.fromarray(np.concatenate(tiles, axis=1)).resize((len(tiles) * 192, 384), Image.NEAREST).save(path)


# Volumes: the same scene in 3D (arrays [Y, X, Z], HU), for the volume mode of weak_bench.py.
HU_BODY, HU_OUTSIDE, HU_ORGAN = 40.0, -900.0, 95.0  # the 2D intensities shifted: the same contrasts


@dataclass
class VolumeCase:
    image: np.ndarray  # float32 [Y, X, Z] in HU
    truth: np.ndarray  # bool [Y, X, Z]
    neighbour: np.ndarray
    tail: np.ndarray
    seam_contrast: float
    pseudo: np.ndarray | None = None  # bool [Y, X, Z]: SAM-like errors slice by slice
    error: str = ""  # "empty", "leak" or "bias", per case as in 2D


def lobed3d(grid: tuple[np.ndarray, np.ndarray, np.ndarray], centre: tuple[float, float, float],
            radii: tuple[float, float, float], angle: float, rng: np.random.Generator,
            wobble: float = 0.12) -> np.ndarray:  # fmt: skip
    """bool [Y, X, Z]: an ellipsoid whose in-plane radius varies with 2-4 random harmonics of the angle
    (the same outline on every slice, scaled down towards its poles)."""
    yy, xx, zz = grid
    (cy, cx, cz), (ry, rx, rz) = centre, radii
    v, u, radius = _wobbled(yy - cy, xx - cx, ry, rx, angle, rng, wobble)
    return (v / ry) ** 2 + (u / rx) ** 2 + ((zz - cz) / rz) ** 2 <= radius**2


def make_volume_case(rng: np.random.Generator, size: int = 64, depth: int = 20) -> VolumeCase:
    """The 2D scene of make_case as a volume: the target a lobed ellipsoid over about half the slices
    with a thin tube (2 voxels) running down, left and along z; the neighbour a larger ellipsoid up and
    to the right, separated by a 1-2 voxel seam of varying contrast; a vertebra through every slice;
    2-3 bowel blobs; a textured body. All structures in the same HU."""
    grid = np.mgrid[0:size, 0:size, 0:depth].astype(np.float32)
    s, d = float(size), float(depth)
    yy, xx = grid[0][:, :, :1], grid[1][:, :, :1]
    body = np.broadcast_to(lobed(yy[:, :, 0], xx[:, :, 0], 0.5 * s, 0.5 * s, 0.45 * s, 0.47 * s, 0.0, rng,
                                 wobble=0.04)[:, :, None], (size, size, depth))  # fmt: skip
    cy, cx = (0.56 + rng.uniform(-0.04, 0.04)) * s, (0.36 + rng.uniform(-0.04, 0.04)) * s
    cz = (0.5 + rng.uniform(-0.05, 0.05)) * d
    ry, rx, rz = rng.uniform(0.10, 0.13) * s, rng.uniform(0.07, 0.09) * s, rng.uniform(0.22, 0.30) * d
    kidney = lobed3d(grid, (cy, cx, cz), (ry, rx, rz), rng.uniform(-0.35, 0.35), rng)
    tail = np.zeros((size, size, depth), bool)
    point = np.array([cy + 0.6 * ry, cx - 0.5 * rx, cz])
    heading, length, climb = rng.uniform(0.6, 1.1), rng.uniform(0.10, 0.16) * s, rng.uniform(-0.25, 0.25)
    for _ in range(int(length * 2)):
        point += 0.5 * np.array([np.cos(heading), -np.sin(heading), climb])
        y, x, z = (int(v) for v in np.rint(point))
        if 0 <= y < size - 1 and 0 <= x < size - 1 and 0 <= z < depth - 1:
            tail[y : y + 2, x : x + 2, z : z + 2] = True
    tail &= ~kidney
    truth = kidney | tail

    ny, nx = cy - 0.55 * ry - 0.10 * s, cx + 0.6 * rx + 0.12 * s
    liver = lobed3d(grid, (ny, nx, cz + rng.uniform(-0.1, 0.1) * d),
                    (rng.uniform(0.16, 0.20) * s, rng.uniform(0.15, 0.19) * s, rng.uniform(0.40, 0.55) * d),
                    rng.uniform(-0.5, 0.5), rng)  # fmt: skip
    seam_px = int(rng.integers(1, 3))
    seam = ndimage.binary_dilation(truth, iterations=seam_px) & ~truth
    liver &= ~truth & ~seam & body
    vertebra = np.broadcast_to(lobed(yy[:, :, 0], xx[:, :, 0], (0.82 + rng.uniform(-0.02, 0.02)) * s,
                                     (0.5 + rng.uniform(-0.03, 0.03)) * s, 0.07 * s, 0.08 * s, 0.0, rng,
                                     wobble=0.05)[:, :, None], (size, size, depth))  # fmt: skip
    near_target = ndimage.binary_dilation(truth, iterations=4)
    bowel = np.zeros((size, size, depth), bool)
    for _ in range(int(rng.integers(2, 4))):
        for _try in range(20):
            blob = lobed3d(grid, (rng.uniform(0.2, 0.8) * s, rng.uniform(0.2, 0.8) * s, rng.uniform(0.2, 0.8) * d),
                           (rng.uniform(0.03, 0.06) * s, rng.uniform(0.03, 0.06) * s, rng.uniform(0.10, 0.25) * d),
                           rng.uniform(0, np.pi), rng)  # fmt: skip
            if not (blob & near_target).any() and (blob & body).sum() == blob.sum():
                bowel |= blob
                break

    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size, depth)), (3.0, 3.0, 1.5))
    image = np.where(body, HU_BODY + 14.0 * field / field.std(), HU_OUTSIDE)
    for structure in (liver, vertebra, bowel, truth):
        image = np.where(structure, HU_ORGAN + rng.uniform(-6, 6), image)
    seam_contrast = float(rng.uniform(0, 1))
    image = np.where(seam & ~liver & body & ~truth, HU_ORGAN - seam_contrast * (HU_ORGAN - HU_BODY + 20), image)
    image = ndimage.gaussian_filter(image, (0.7, 0.7, 0.4)) + rng.normal(0, 12, (size, size, depth))
    if not (liver & ndimage.binary_dilation(truth, iterations=seam_px + 1)).any():
        liver |= seam & body
    return VolumeCase(image=image.astype(np.float32), truth=truth, neighbour=liver, tail=tail,
                      seam_contrast=seam_contrast)  # fmt: skip


def sam_like_volume(case: VolumeCase, rng: np.random.Generator, errors: PseudoErrors, *,
                    empty: bool) -> tuple[np.ndarray, str]:  # fmt: skip
    """SAM works slice by slice: each slice's pseudo-label is sam_like of that slice (the leak decided by
    the case's seam contrast, its reach and the lateral shift drawn per slice)."""
    if empty:
        return np.zeros_like(case.truth), "empty"
    mask = np.zeros_like(case.truth)
    for z in range(case.truth.shape[2]):
        if case.truth[:, :, z].any():
            plane = Case(image=case.image[:, :, z], truth=case.truth[:, :, z], neighbour=case.neighbour[:, :, z],
                         tail=case.tail[:, :, z], seam_contrast=case.seam_contrast)  # fmt: skip
            mask[:, :, z] = sam_like(plane, rng, errors, empty=False)[0]
    return mask, "leak" if case.seam_contrast < errors.leak_below else "bias"


def make_volume_split(seed: int, n: int, *, size: int, depth: int, errors: PseudoErrors) -> list[VolumeCase]:
    """n volumes, each from its own generator ([seed, i]); exactly round(empty_fraction * n) empty."""
    empty = set(np.random.default_rng([seed, 10**6]).permutation(n)[: round(errors.empty_fraction * n)].tolist())
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        case = make_volume_case(rng, size, depth)
        case.pseudo, case.error = sam_like_volume(case, rng, errors, empty=i in empty)
        cases.append(case)
    return cases
