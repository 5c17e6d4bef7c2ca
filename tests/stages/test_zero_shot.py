"""The zero-shot method on tiny models: shapes, frames, determinism, and shared per-image work."""

from __future__ import annotations

import numpy as np
import pytest

from mcs_batch.config import load_config
from mcs_batch.errors import ErrorCode
from mcs_batch.models.registry import load_models
from mcs_batch.models.visual_prompts import VisualPrompts
from mcs_batch.stages.zero_shot import ImageKey, sam_masks, segment_images

TWO_TARGETS = "targets=[{name: lungs, prompts: [a lung, both lungs]}, {name: heart, prompts: [the heart]}]"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cfg = load_config(preset="tiny", overrides=[f"models.cache_dir={tmp_path_factory.mktemp('cache')}"])
    return load_models(cfg.models)


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(90, 160), (200, 120), (64, 64)]:
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        img[h // 4 : h // 2, w // 3 : 2 * w // 3] = 220  # a bright block to find
        out.append(img)
    return out


def test_results_are_in_each_image_frame(models):
    cfg = load_config(preset="tiny", overrides=[TWO_TARGETS])
    imgs = images()
    results = segment_images(models, imgs, [ImageKey("case", k) for k in range(3)], cfg)
    assert [len(r) for r in results] == [2, 2, 2]
    for image, row in zip(imgs, results, strict=True):
        for result in row:
            assert result.saliency.shape == image.shape[:2] and result.saliency.dtype == np.float32
            assert result.saliency.min() >= 0.0 and result.saliency.max() <= 1.0
            assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
            boxes = result.prompts.boxes_xyxy
            assert (boxes[:, [0, 2]] <= image.shape[1]).all() and (boxes[:, [1, 3]] <= image.shape[0]).all()
        assert [r.target for r in row] == ["lungs", "heart"]


def test_several_targets_equal_each_target_alone(models):
    """Sharing the prefix and the SAM embedding changes nothing about any one target's result."""
    cfg = load_config(preset="tiny", overrides=[TWO_TARGETS])
    imgs, keys = images()[:2], [ImageKey("c", 3), ImageKey("c", 4)]
    together = segment_images(models, imgs, keys, cfg)
    for j, target in enumerate(cfg.targets):
        alone = segment_images(models, imgs, keys, cfg, targets=[target])
        for i in range(2):
            np.testing.assert_allclose(together[i][j].saliency, alone[i][0].saliency, atol=1e-5)
            np.testing.assert_array_equal(together[i][j].mask, alone[i][0].mask)


def test_image_work_is_done_once_per_image(models, monkeypatch):
    calls = {"sam_embed": 0}
    original = models.sam.embed

    def counting_embed(batch):
        calls["sam_embed"] += 1
        calls["sam_images"] = len(batch)
        return original(batch)

    monkeypatch.setattr(models.sam, "embed", counting_embed)
    cfg = load_config(preset="tiny", overrides=[TWO_TARGETS])
    segment_images(models, images(), [ImageKey("c", k) for k in range(3)], cfg)
    assert calls == {"sam_embed": 1, "sam_images": 3}  # one encoder call for 3 images x 2 targets


def test_deterministic_per_seed_case_and_slice(models):
    cfg = load_config(preset="tiny")
    img = images()[:1]
    a = segment_images(models, img, [ImageKey("c", 0)], cfg)[0][0].saliency
    b = segment_images(models, img, [ImageKey("c", 0)], cfg)[0][0].saliency
    c = segment_images(models, img, [ImageKey("c", 1)], cfg)[0][0].saliency
    d = segment_images(models, img, [ImageKey("c", 0)], load_config(preset="tiny", overrides=["seed=5"]))[0][0].saliency
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_ablation_masks_follow_the_papers_rows():
    from mcs_batch.models.visual_prompts import PromptSettings
    from mcs_batch.stages.zero_shot import ablation_mask

    saliency = np.zeros((40, 60), np.float32)
    saliency[5:15, 5:20] = 0.9  # big blob
    saliency[25:30, 40:45] = 0.8  # small blob
    saliency[20, 30] = 0.35  # a speck above the fixed threshold, below k-means' split
    coarse = PromptSettings(k_components=1, threshold=0.3)
    raw = ablation_mask(saliency, coarse, "saliency")
    post = ablation_mask(saliency, coarse, "postprocess")
    comps = ablation_mask(saliency, coarse, "components")
    assert raw.sum() == 150 + 25 + 1  # the map thresholded as it is
    assert post.sum() == 150 + 25  # k-means drops the speck
    assert comps.sum() == 150 and comps[10, 10]  # only the largest component is kept
    assert not ablation_mask(np.zeros((4, 4), np.float32), coarse, "components").any()


def test_ablation_run_skips_sam(models, monkeypatch):
    monkeypatch.setattr(models.sam, "embed", lambda *a: (_ for _ in ()).throw(AssertionError("SAM was called")))
    cfg = load_config(preset="tiny", overrides=["ablation=components"])
    (row,) = segment_images(models, images()[:1], [ImageKey("c", 0)], cfg)
    assert row[0].mask.shape == (90, 160) and row[0].sam_score == 0.0
    np.testing.assert_array_equal(row[0].mask, row[0].prompts.coarse_mask)  # components = the coarse mask kept


def test_images_without_prompts_skip_the_sam_encoder(models, monkeypatch):
    def refuse(_images):
        raise AssertionError("the encoder ran for images without prompts")

    monkeypatch.setattr(models.sam, "embed", refuse)
    cfg = load_config(preset="tiny", overrides=[TWO_TARGETS])
    empty = VisualPrompts(np.zeros((0, 0), bool), np.zeros((0, 4)), np.zeros((0, 2)), 0, ErrorCode.EMPTY_SALIENCY)
    imgs = images()[:2]
    results = sam_masks(models.sam, imgs, [[empty, empty], [empty, empty]], cfg.targets)
    assert [[m.shape for m, _ in row] for row in results] == [[i.shape[:2]] * 2 for i in imgs]
    assert not any(m.any() or score for row in results for m, score in row)
