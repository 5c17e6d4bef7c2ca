"""Visual prompts on hand-built saliency maps: exact masks, components, boxes and points."""

from __future__ import annotations

import numpy as np
import pytest

from mcs_batch.errors import CaseError, ConfigError, ErrorCode
from mcs_batch.models.visual_prompts import (
    BoxMode,
    CoarseMethod,
    PromptSettings,
    boxes_from_components,
    coarse_mask,
    largest_components,
    sample_points,
    visual_prompts,
)


def _two_blobs(height: int = 40, width: int = 60) -> np.ndarray:
    """Saliency 0.1 background; a 10x12 blob (120 px) at rows 5..14, cols 8..19 valued 0.9;
    a 4x5 blob (20 px) at rows 30..33, cols 40..44 valued 0.8."""
    saliency = np.full((height, width), 0.1, dtype=np.float32)
    saliency[5:15, 8:20] = 0.9
    saliency[30:34, 40:45] = 0.8
    return saliency


def _bimodal(rng: np.random.Generator, shape=(50, 70)) -> tuple[np.ndarray, np.ndarray]:
    """Noisy bimodal map (background ~0.2, foreground ~0.75) and its true foreground."""
    truth = np.zeros(shape, dtype=bool)
    truth[10:30, 20:55] = True
    saliency = np.where(truth, 0.75, 0.2) + rng.normal(0, 0.05, shape)
    return np.clip(saliency, 0, 1).astype(np.float32), truth


# -- coarse mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kmeans", "otsu", "threshold"])
def test_coarse_mask_recovers_bimodal_foreground(method):
    saliency, truth = _bimodal(np.random.default_rng(0))
    mask = coarse_mask(saliency, method=method, threshold=0.5)
    assert mask.dtype == bool and mask.shape == truth.shape
    np.testing.assert_array_equal(mask, truth)


def test_kmeans_threshold_is_midpoint_of_cluster_means():
    # values 0.0 (x60), 0.2 (x20), 0.6 (x15), 1.0 (x5): Lloyd from (0, 1) -> t=0.5 -> means
    # 0.05 / 0.7 -> t=0.375 -> same assignment: foreground = {0.6, 1.0}.
    values = np.repeat(np.array([0.0, 0.2, 0.6, 1.0], dtype=np.float32), [60, 20, 15, 5]).reshape(10, 10)
    np.testing.assert_array_equal(coarse_mask(values, method="kmeans"), values >= 0.6)


def test_kmeans_foreground_is_the_higher_cluster_even_when_it_is_the_larger():
    saliency = np.full((20, 20), 0.9, dtype=np.float32)
    saliency[:5, :5] = 0.1
    mask = coarse_mask(saliency)
    assert mask.sum() == 400 - 25 and not mask[:5, :5].any()


def test_threshold_is_strict_like_the_reference():
    saliency = np.array([[0.29, 0.3, 0.31]], dtype=np.float32)
    np.testing.assert_array_equal(coarse_mask(saliency, method="threshold", threshold=0.3), [[0, 0, 1]])


def test_kmeans_matches_scikit_learn_on_bimodal_maps():
    """The reference: KMeans(n_clusters=2, random_state=10) on the values, foreground = higher centre."""
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(3)
    for _ in range(5):
        saliency, _ = _bimodal(rng)
        saliency = np.round(saliency * 255) / 255  # the reference reads the map back from an 8-bit PNG
        kmeans = cluster.KMeans(n_clusters=2, random_state=10).fit(saliency.reshape(-1, 1))
        reference = kmeans.labels_ != np.argmin(kmeans.cluster_centers_.ravel())
        np.testing.assert_array_equal(coarse_mask(saliency).ravel(), reference)


@pytest.mark.parametrize("method", ["kmeans", "otsu"])
def test_constant_map_has_no_foreground(method):
    assert not coarse_mask(np.full((8, 9), 0.7, dtype=np.float32), method=method).any()


def test_coarse_mask_refuses_bad_input():
    with pytest.raises(ValueError, match="2D"):
        coarse_mask(np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="floating"):
        coarse_mask(np.zeros((4, 4), dtype=np.uint8))
    bad = np.zeros((4, 4), dtype=np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(CaseError) as info:
        coarse_mask(bad)
    assert info.value.code is ErrorCode.MODEL_ERROR


# -- components ---------------------------------------------------------------------------------


def test_largest_components_keeps_the_bigger_blob_then_both():
    mask = _two_blobs() > 0.5
    one = largest_components(mask, 1)
    assert one.sum() == 120 and one[5:15, 8:20].all()
    np.testing.assert_array_equal(largest_components(mask, 2), mask)
    np.testing.assert_array_equal(largest_components(mask, 5), mask)


def test_largest_components_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal: one component with 8-, three with 4-
    assert largest_components(mask, 1).sum() == 3
    assert largest_components(mask, 1, connectivity=4).sum() == 1


def test_largest_components_ties_prefer_first_in_raster_order():
    mask = np.zeros((10, 10), dtype=bool)
    mask[6:8, 0:2] = True  # 4 px, first pixel at row 6
    mask[1:3, 7:9] = True  # 4 px, first pixel at row 1 -> wins the tie
    kept = largest_components(mask, 1)
    assert kept[1:3, 7:9].all() and kept.sum() == 4


def test_largest_components_of_empty_mask_is_empty():
    assert not largest_components(np.zeros((5, 5), dtype=bool), 2).any()


# -- boxes --------------------------------------------------------------------------------------


def test_union_box_coordinates():
    mask = _two_blobs() > 0.5
    # cols 8..44, rows 5..33 -> x1 = 44 + 1, y1 = 33 + 1
    np.testing.assert_array_equal(boxes_from_components(mask), [[8, 5, 45, 34]])
    assert boxes_from_components(mask).dtype == np.float32


def test_per_component_boxes_are_ordered_by_size():
    mask = _two_blobs() > 0.5
    boxes = boxes_from_components(mask, mode="per_component")
    np.testing.assert_array_equal(boxes, [[8, 5, 20, 15], [40, 30, 45, 34]])
    mask[0:2, 0:2] = True  # 4 px, smallest: last although first in raster order
    boxes = boxes_from_components(mask, mode=BoxMode.PER_COMPONENT)
    np.testing.assert_array_equal(boxes[-1], [0, 0, 2, 2])


def test_box_touching_the_border_is_clipped_to_the_last_index():
    mask = np.zeros((10, 12), dtype=bool)
    mask[7:10, 9:12] = True  # reaches the last row and column
    np.testing.assert_array_equal(boxes_from_components(mask), [[9, 7, 11, 9]])


def test_component_inside_a_hole_gets_no_box_of_its_own():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:15, 2:15] = True
    mask[4:13, 4:13] = False  # a ring
    mask[7:9, 7:9] = True  # an island in its hole
    np.testing.assert_array_equal(boxes_from_components(mask, mode="per_component"), [[2, 2, 15, 15]])


def test_boxes_of_empty_mask():
    assert boxes_from_components(np.zeros((4, 4), dtype=bool), mode="per_component").shape == (0, 4)


# -- points -------------------------------------------------------------------------------------


def test_points_are_reproducible_and_inside_the_mask():
    mask = _two_blobs() > 0.5
    a = sample_points(mask, 10, np.random.default_rng(7))
    b = sample_points(mask, 10, np.random.default_rng(7))
    c = sample_points(mask, 10, np.random.default_rng(8))
    assert a.shape == (10, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    x, y = a[:, 0].astype(int), a[:, 1].astype(int)
    assert mask[y, x].all()
    assert len({(int(px), int(py)) for px, py in a}) == 10  # without replacement


def test_points_from_a_small_mask_are_all_its_pixels():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1, 3] = mask[4, 0] = True
    points = sample_points(mask, 10, np.random.default_rng(0))
    assert sorted(map(tuple, points.tolist())) == [(0.0, 4.0), (3.0, 1.0)]
    assert sample_points(np.zeros((3, 3), dtype=bool), 4, np.random.default_rng(0)).shape == (0, 2)


# -- visual_prompts -----------------------------------------------------------------------------


def test_visual_prompts_two_blobs():
    saliency = _two_blobs()
    one = visual_prompts(saliency, PromptSettings())
    assert one.reason is None and not one.is_empty and one.n_components == 1
    np.testing.assert_array_equal(one.boxes_xyxy, [[8, 5, 20, 15]])
    assert one.points_xy.shape == (0, 2) and one.coarse_mask.sum() == 120

    two = visual_prompts(saliency, PromptSettings(k_components=2, box_mode="per_component"))
    np.testing.assert_array_equal(two.boxes_xyxy, [[8, 5, 20, 15], [40, 30, 45, 34]])
    assert two.n_components == 2


def test_visual_prompts_points_are_seeded():
    settings = PromptSettings(n_points=5)
    a = visual_prompts(_two_blobs(), settings, np.random.default_rng(1))
    b = visual_prompts(_two_blobs(), settings, np.random.default_rng(1))
    np.testing.assert_array_equal(a.points_xy, b.points_xy)
    assert a.coarse_mask[a.points_xy[:, 1].astype(int), a.points_xy[:, 0].astype(int)].all()
    with pytest.raises(ValueError, match="rng"):
        visual_prompts(_two_blobs(), settings)


@pytest.mark.parametrize("method", list(CoarseMethod))
def test_constant_map_gives_empty_saliency(method):
    prompts = visual_prompts(np.full((16, 24), 0.5, dtype=np.float32), PromptSettings(method=method))
    assert prompts.reason is ErrorCode.EMPTY_SALIENCY and prompts.is_empty
    assert prompts.boxes_xyxy.shape == (0, 4) and prompts.points_xy.shape == (0, 2)
    assert prompts.coarse_mask.shape == (16, 24) and not prompts.coarse_mask.any()


def test_empty_coarse_mask_gives_empty_saliency():
    saliency = np.linspace(0, 0.2, 100, dtype=np.float32).reshape(10, 10)  # all below the threshold
    prompts = visual_prompts(saliency, PromptSettings(method="threshold", n_points=3), np.random.default_rng(0))
    assert prompts.reason is ErrorCode.EMPTY_SALIENCY and prompts.boxes_xyxy.shape == (0, 4)


def test_prompt_settings_convert_and_refuse():
    settings = PromptSettings(method="otsu", box_mode="per_component")
    assert settings.method is CoarseMethod.OTSU and settings.box_mode is BoxMode.PER_COMPONENT
    with pytest.raises(ConfigError, match="crf"):
        PromptSettings(method="crf")
    with pytest.raises(ConfigError, match="k_components"):
        PromptSettings(k_components=0)
    with pytest.raises(ConfigError, match="n_points"):
        PromptSettings(n_points=-1)
