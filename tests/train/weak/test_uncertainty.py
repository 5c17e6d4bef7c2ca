"""Mask and uncertainty scores of the ensemble on hand-built probability maps."""

from __future__ import annotations

import numpy as np
import pytest

from mcs_batch.train.weak.uncertainty import (
    SliceMoments,
    binary_entropy,
    boundary_length,
    case_uncertainty,
    score_moments,
    score_slice,
)


def square(p_in: float, p_out: float, size: int = 16) -> np.ndarray:
    probs = np.full((size, size), p_out, np.float32)
    probs[4:12, 4:12] = p_in
    return probs


def test_mean_probability_is_thresholded_at_the_given_value():
    members = np.stack([square(0.3, 0.0), square(0.1, 0.0)])  # mean 0.2 inside: not > 0.2
    assert not score_slice(members, 0.2).mask.any()
    assert score_slice(members, 0.15).mask.sum() == 64
    members = np.stack([square(0.9, 0.0), square(0.1, 0.0), square(0.0, 0.0)])  # mean 1/3
    assert score_slice(members, 0.2).mask.sum() == 64


def test_confident_agreeing_members_are_less_uncertain_than_doubtful_or_disagreeing_ones():
    confident = score_slice(np.stack([square(0.99, 0.01)] * 3), 0.2)
    doubtful = score_slice(np.stack([square(0.6, 0.3)] * 3), 0.2)
    disagreeing = score_slice(np.stack([square(1.0, 0.0), square(0.0, 0.0), square(1.0, 0.0)]), 0.2)
    assert confident.spread == pytest.approx(0.0, abs=1e-6) and disagreeing.spread > 0.4
    c, d = case_uncertainty([confident]), case_uncertainty([doubtful])
    assert c["uncertainty"] < 1.0 < d["uncertainty"]
    assert case_uncertainty([disagreeing])["uncertainty_spread"] > c["uncertainty_spread"]


def test_boundary_length_and_entropy():
    mask = np.zeros((10, 10), bool)
    mask[2:7, 2:7] = True
    assert boundary_length(mask) == 16  # a 5x5 square: 25 - 9 inner pixels
    assert boundary_length(np.zeros((4, 4), bool)) == 0
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0)
    assert binary_entropy(np.array([0.0, 1.0])).max() < 1e-4


def test_empty_prediction_and_no_slices():
    empty = score_slice(np.zeros((2, 8, 8), np.float32), 0.2)
    assert not empty.mask.any() and empty.boundary_pixels == 0
    assert case_uncertainty([empty])["uncertainty"] == pytest.approx(binary_entropy(np.zeros((8, 8))).sum())
    assert case_uncertainty([]) == {"uncertainty": None, "uncertainty_spread": None}
    with pytest.raises(ValueError, match=r"\[M, H, W\]"):
        score_slice(np.zeros((8, 8)), 0.2)


def test_running_moments_score_as_the_stacked_maps():
    rng = np.random.default_rng(0)
    probs = rng.random((30, 24, 20), dtype=np.float32) ** 3  # skewed, as foreground probabilities are
    moments = SliceMoments()
    for p in probs:
        moments.add(p)
    assert moments.count == 30
    assert np.allclose(moments.mean, probs.mean(axis=0), atol=1e-6)
    assert np.allclose(moments.std, probs.std(axis=0), atol=1e-6)
    a, b = score_moments(moments, 0.2), score_slice(probs, 0.2)
    assert np.array_equal(a.mask, b.mask) and a.boundary_pixels == b.boundary_pixels
    assert a.entropy_sum == pytest.approx(b.entropy_sum, rel=1e-6) and a.spread == pytest.approx(b.spread, rel=1e-6)
    on_the_threshold = SliceMoments()
    for p in (square(0.3, 0.0), square(0.1, 0.0)):  # mean 0.2 inside, as in the first test: not > 0.2
        on_the_threshold.add(p)
    assert not score_moments(on_the_threshold, 0.2).mask.any()
    with pytest.raises(ValueError, match="no member's map"):
        _ = SliceMoments().mean
    with pytest.raises(ValueError, match=r"\[H, W\] like the others"):
        moments.add(np.zeros((24, 21), np.float32))
