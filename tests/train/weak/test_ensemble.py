"""The ensemble predictor on a real nnU-Net ensemble (random weights, tiny network): members streamed one
at a time give the scores of all members' maps held at once; checked and changed member files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mcs_batch.errors import ConfigError
from mcs_batch.train.weak.ensemble import EnsemblePredictor
from mcs_batch.train.weak.synthetic_ensemble import write_random_ensemble
from mcs_batch.train.weak.uncertainty import case_uncertainty, score_moments, score_slice


def images(n: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        image = rng.integers(0, 60, (size, size + 8, 3), dtype=np.uint8)  # not square: the frame is kept
        image[8:20, 10:26] += 150
        out.append(image)
    return out


def test_streamed_members_score_as_all_maps_held_at_once(tmp_path: Path):
    write_random_ensemble(tmp_path, members=4, image_size=32, base_features=4, max_features=32)
    predictor = EnsemblePredictor(str(tmp_path), storage=None)
    assert predictor.n_members == 4
    slices = images(3)
    streamed = predictor.moments(slices)
    held = [predictor.probabilities(image) for image in slices]  # [M, H, W] per slice, as refine did before
    assert held[0].shape == (4, 32, 40) and held[0].dtype == np.float32
    assert all(m.count == 4 for m in streamed)
    threshold = float(np.median(held[0].mean(axis=0)))  # a mask that is neither empty nor everything
    for moments, probs in zip(streamed, held, strict=True):
        assert np.allclose(moments.mean, probs.mean(axis=0), atol=1e-6)
        assert np.allclose(moments.std, probs.std(axis=0), atol=1e-6)
        a, b = score_moments(moments, threshold), score_slice(probs, threshold)
        assert 0 < a.mask.sum() < a.mask.size and np.array_equal(a.mask, b.mask)
        assert a.boundary_pixels == b.boundary_pixels
        assert a.entropy_sum == pytest.approx(b.entropy_sum, rel=1e-6)
        assert a.spread == pytest.approx(b.spread, rel=1e-5) and a.spread > 0.0  # the members differ
    by_moments = case_uncertainty([score_moments(m, threshold) for m in streamed])
    by_maps = case_uncertainty([score_slice(p, threshold) for p in held])
    assert by_moments == pytest.approx(by_maps, rel=1e-5)
    newest = EnsemblePredictor(str(tmp_path), storage=None, max_members=2)
    assert [m.name for m in newest.members] == ["member02.pt", "member03.pt"]
    assert np.allclose(newest.probabilities(slices[0]), held[0][2:], atol=1e-6)


def test_member_files_are_checked_and_a_changed_one_is_refused(tmp_path: Path):
    write_random_ensemble(tmp_path, members=2, image_size=32, base_features=4, max_features=32)
    predictor = EnsemblePredictor(str(tmp_path), storage=None)
    member = tmp_path / "ensemble" / "member01.pt"
    stat = member.stat()
    os.utime(member, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # replaced after the check
    with pytest.raises(ConfigError, match=r"member01\.pt: .* changed after its sha256 was checked"):
        predictor.moments(images(1))
    document = json.loads((tmp_path / "ensemble" / "ensemble.json").read_text())
    document["members"][0]["sha256"] = "0" * 64
    (tmp_path / "ensemble" / "ensemble.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"member00\.pt: sha256 differs from ensemble\.json"):
        EnsemblePredictor(str(tmp_path), storage=None)
