"""Dice, NSD and HD95 against hand-computed cases and an independent brute-force implementation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mcs_batch.eval.metrics import (
    boundary,
    case_metrics,
    dice,
    extent_diagonal,
    hausdorff95,
    surface_dice,
    surface_distances,
)


def square(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# -- hand-computed cases -------------------------------------------------------------------------------


def test_identical_masks_score_perfectly_in_2d_and_3d():
    mask2 = square((10, 10), (2, 5), (2, 5))
    mask3 = np.zeros((6, 7, 8), bool)
    mask3[1:4, 2:6, 3:5] = True
    for mask in (mask2, mask3):
        m = case_metrics(mask, mask.copy())
        assert (m.dice, m.nsd, m.hd95) == (1.0, 1.0, 0.0)
        assert m.truth_voxels == m.pred_voxels == mask.sum()


def test_square_shifted_by_one_column():
    # A 4x4 square and the same square one column to the right. Overlap 12 of 16 + 16 pixels.
    # Each boundary has 12 pixels: 6 lie on the other boundary (d = 0), 6 are one pixel away (d = 1).
    truth = square((10, 10), (2, 5), (2, 5))
    pred = square((10, 10), (2, 5), (3, 6))
    assert dice(pred, truth) == pytest.approx(0.75)
    d_pred, d_truth = surface_distances(pred, truth)
    assert sorted(d_pred.tolist()) == sorted(d_truth.tolist()) == [0.0] * 6 + [1.0] * 6
    assert surface_dice(pred, truth, tolerance=2) == 1.0
    assert surface_dice(pred, truth, tolerance=1) == 1.0  # d = tolerance counts as within
    assert surface_dice(pred, truth, tolerance=0.5) == 0.5
    assert hausdorff95(pred, truth) == 1.0


def test_square_shifted_by_three_columns():
    # 10x10 square at rows/cols 5..14, prediction at cols 8..17: overlap 10 x 7 = 70 of 100 + 100.
    # Truth boundary (36 pixels) to the prediction's boundary: top and bottom rows 7 x 0 and 3, 2, 1 each;
    # left column 8 x 3; right column 1, 2, 3, 3, 3, 3, 2, 1. Within 2 pixels: 9 + 9 + 0 + 4 = 22 of 36,
    # and the same the other way (symmetric). 95th percentile of the 36 sorted distances
    # (14 zeros, 4 ones, 4 twos, 14 threes) at index 33.25: 3.
    truth = square((20, 24), (5, 14), (5, 14))
    pred = square((20, 24), (5, 14), (8, 17))
    m = case_metrics(pred, truth, tolerance=2.0)
    assert m.dice == pytest.approx(0.7)
    assert m.nsd == pytest.approx(44 / 72)
    assert m.hd95 == 3.0
    d_pred, d_truth = surface_distances(pred, truth)
    assert sorted(d_truth.tolist()) == sorted(d_pred.tolist()) == [0.0] * 14 + [1.0] * 4 + [2.0] * 4 + [3.0] * 14
    assert case_metrics(pred, truth, tolerance=3.0).nsd == 1.0


def test_spacing_turns_pixels_into_millimetres():
    # The same 3-column shift with 0.5 mm columns is 1.5 mm: within a 2 mm tolerance everywhere.
    truth = square((20, 24), (5, 14), (5, 14))
    pred = square((20, 24), (5, 14), (8, 17))
    m = case_metrics(pred, truth, spacing=(1.0, 0.5), tolerance=2.0)
    assert m.nsd == 1.0 and m.hd95 == 1.5 and m.dice == pytest.approx(0.7)
    # 2 mm rows: the 1-row shift of a square is 2 mm, exactly at the tolerance.
    shifted_rows = square((20, 24), (6, 15), (5, 14))
    assert surface_dice(shifted_rows, truth, spacing=(2.0, 1.0), tolerance=2.0) == 1.0
    assert surface_dice(shifted_rows, truth, spacing=(2.0, 1.0), tolerance=1.9) < 1.0


def test_empty_and_full_masks():
    empty, full = np.zeros((8, 6), bool), np.ones((8, 6), bool)
    both_empty = case_metrics(empty, empty)
    assert (both_empty.dice, both_empty.nsd, both_empty.hd95) == (1.0, 1.0, 0.0)
    for pred, truth in ((empty, full), (full, empty)):
        m = case_metrics(pred, truth, spacing=(0.5, 2.0))
        assert (m.dice, m.nsd) == (0.0, 0.0)
        assert m.hd95 == pytest.approx(np.hypot(8 * 0.5, 6 * 2.0)) == extent_diagonal((8, 6), (0.5, 2.0))
    full_vs_full = case_metrics(full, full)
    assert (full_vs_full.dice, full_vs_full.nsd, full_vs_full.hd95) == (1.0, 1.0, 0.0)
    # A full mask's boundary is the array's outer ring (the edge counts as background).
    assert boundary(full).sum() == 2 * 8 + 2 * 6 - 4
    # Full 8x6 vs. its left half (columns 0..2). The half's boundary (18 pixels) lies on the full
    # mask's ring or, on column 2, 1-2 pixels from it: all within 2. The full ring (24 pixels): 12 lie
    # on the half's boundary; rows 0 and 7 at columns 3, 4, 5 are 1, 2, 3 away; column 5 (rows 1..6)
    # is 3 away: 16 within 2. NSD = (18 + 16) / 42; HD95 = max(P95 of the half's, P95 of the ring's) = 3.
    half = full.copy()
    half[:, 3:] = False
    m = case_metrics(half, full)
    assert m.dice == pytest.approx(48 / 72)
    assert m.nsd == pytest.approx(34 / 42)
    assert m.hd95 == 3.0


def test_3d_cube_shift_and_empty_volume():
    truth = np.zeros((12, 12, 12), bool)
    truth[3:8, 3:8, 3:8] = True
    pred = np.roll(truth, 2, axis=2)
    m = case_metrics(pred, truth, spacing=(1.0, 1.0, 1.0), tolerance=2.0)
    assert m.dice == pytest.approx(2 * 75 / 250)
    assert m.nsd == 1.0 and m.hd95 == 2.0
    assert case_metrics(pred, truth, tolerance=1.0).nsd < 1.0
    empty = np.zeros_like(truth)
    assert case_metrics(empty, truth).hd95 == pytest.approx(np.sqrt(3 * 12.0**2))


def test_label_maps_count_any_nonzero_label_and_bad_input_is_refused():
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 1:3] = 1
    labels[3:5, 3:5] = 2
    assert dice(labels, labels > 0) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(labels, labels, spacing=(1.0,))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(labels, labels, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(labels, labels, tolerance=-1)
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(labels, np.zeros_like(labels))


# -- against an independent brute force ------------------------------------------------------------------


def brute_boundary(mask: np.ndarray) -> list[tuple[int, ...]]:
    """Foreground points with a face neighbour outside the mask or outside the array: plain loops."""
    points = []
    for index in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[index]:
            continue
        for axis in range(mask.ndim):
            for step in (-1, 1):
                neighbour = list(index)
                neighbour[axis] += step
                if not 0 <= neighbour[axis] < mask.shape[axis] or not mask[tuple(neighbour)]:
                    points.append(index)
                    break
            else:
                continue
            break
    return points


def brute_metrics(pred, truth, spacing, tolerance):
    """Pairwise distances between all boundary points (no distance transform, no cropping)."""
    step = np.asarray(spacing, float)
    bp = np.asarray(brute_boundary(pred), float) * step
    bt = np.asarray(brute_boundary(truth), float) * step
    pairwise = np.sqrt(((bp[:, None, :] - bt[None, :, :]) ** 2).sum(-1))
    d_pred, d_truth = pairwise.min(axis=1), pairwise.min(axis=0)
    nsd = ((d_pred <= tolerance + 1e-9).sum() + (d_truth <= tolerance + 1e-9).sum()) / (len(bp) + len(bt))
    hd95 = max(np.percentile(d_pred, 95), np.percentile(d_truth, 95))
    overlap = np.logical_and(pred, truth).sum()
    return 2 * overlap / (pred.sum() + truth.sum()), nsd, hd95


def random_shape(rng, shape):
    """Blobs: a few random boxes and discs, unioned; sometimes touching the array's edge."""
    mask = np.zeros(shape, bool)
    grid = np.indices(shape)
    for _ in range(rng.integers(1, 4)):
        centre = [rng.uniform(-1, n) for n in shape]
        radius = rng.uniform(1.0, max(shape) / 2.5)
        if rng.random() < 0.5:
            dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
            mask |= dist <= radius
        else:
            box = tuple(slice(max(0, int(c - radius)), int(c + radius) + 1) for c in centre)
            mask[box] = True
    return mask


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(6, 20)), int(rng.integers(6, 20))) if seed % 2 else tuple(rng.integers(4, 10, 3))
    spacing = tuple(rng.choice([0.5, 0.8, 1.0, 1.7], size=len(shape)))
    tolerance = float(rng.choice([1.0, 2.0, 2.5]))
    pred, truth = random_shape(rng, shape), random_shape(rng, shape)
    assert pred.any() and truth.any()  # (deterministic per seed; empty masks have their own test)
    expected = brute_metrics(pred, truth, spacing, tolerance)
    m = case_metrics(pred, truth, spacing=spacing, tolerance=tolerance)
    assert m.dice == pytest.approx(expected[0], abs=1e-12)
    assert m.nsd == pytest.approx(expected[1], abs=1e-12)
    assert m.hd95 == pytest.approx(expected[2], abs=1e-9)
    assert sorted(map(tuple, np.argwhere(boundary(pred)).tolist())) == sorted(brute_boundary(pred))
