"""Batched SAM against segment_anything's own SamPredictor, on random weights; safe checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.build_sam import _build_sam

from mcs_batch.errors import ConfigError
from mcs_batch.models.sam import (
    SAM_BUILDERS,
    SamSegmenter,
    SamVariant,
    fused_attention,
    load_sam,
    random_sam,
    write_random_sam,
)
from mcs_batch.models.visual_prompts import largest_components

# Images of different, non-square sizes in one batch; image 1 gets 3 boxes, image 2 none.
SIZES = [(120, 200), (301, 170), (64, 96)]
BOXES = [
    np.array([[10, 20, 150, 100]], dtype=np.float32),
    np.array([[5, 5, 100, 200], [50, 100, 160, 290], [0, 0, 169, 300]], dtype=np.float32),
    np.zeros((0, 4), dtype=np.float32),
]


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for height, width in SIZES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image[height // 4 : height // 2, width // 3 : 2 * width // 3] = (230, 200, 40)  # some structure
        images.append(image)
    return images


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _predictor_union(predictor: SamPredictor, image, boxes, points=None):
    """segment_anything's own path: set_image, then predict per box; union of the masks."""
    predictor.set_image(image)
    union = np.zeros(image.shape[:2], dtype=bool)
    scores = []
    labels = None if points is None else np.ones(len(points), dtype=int)
    for box in boxes:
        masks, iou, _ = predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=False)
        union |= masks[0]
        scores.append(iou[0])
    return union, np.asarray(scores, dtype=np.float32)


def _segment_each(segmenter: SamSegmenter, images, boxes_per_image, k_components=None):
    """One target per image: the prompted images embedded in one call, then each decoded."""
    prompted = [i for i, boxes in enumerate(boxes_per_image) if len(boxes)]
    embeddings = segmenter.embed([images[i] for i in prompted])
    at = {i: n for n, i in enumerate(prompted)}
    return [
        segmenter.segment(embeddings, at[i], boxes, k_components=k_components)
        if i in at
        else segmenter.segment(embeddings, 0, np.zeros((0, 4)), k_components=k_components)
        for i, boxes in enumerate(boxes_per_image)
    ]


def _assert_matches_predictor(model, images, boxes_per_image):
    results = _segment_each(SamSegmenter(model), images, boxes_per_image)
    predictor = SamPredictor(model)
    for image, boxes, result in zip(images, boxes_per_image, results, strict=True):
        if len(boxes) == 0:
            assert not result.mask.any() and result.score == 0.0 and result.per_box_scores.shape == (0,)
            continue
        expected, scores = _predictor_union(predictor, image, boxes)
        assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
        assert _iou(result.mask, expected) >= 0.999
        np.testing.assert_allclose(result.per_box_scores, scores, atol=1e-4)
        assert 0.0 < expected.mean() < 1.0  # a mask worth comparing
        assert result.score == pytest.approx(float(scores.mean()), abs=1e-4)
    return results


@pytest.fixture(scope="module")
def tiny():
    return random_sam("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_embeddings(tiny):
    """The three test images embedded once by the tiny model (one encoder call)."""
    return SamSegmenter(tiny).embed(_images())


# -- builders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_builders_match_segment_anything_architecture(variant):
    with torch.device("meta"):  # shapes only, no memory
        ours, theirs = SAM_BUILDERS[variant](), sam_model_registry[variant]()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_tiny_builder_matches_environment_recipe(tiny):
    theirs = _build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    assert {k: v.shape for k, v in tiny.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert set(SAM_BUILDERS) == set(SamVariant)


# -- the fused attention == segment_anything's -------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_attention_matches_segment_anything(batch):
    """Windowed (block 0) and global (block 1) attention, with relative positions: the encoder's
    output with the fused forward equals segment_anything's own, and the model is left as it was."""
    encoder = random_sam("tiny", seed=3).image_encoder
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in encoder.blocks:  # SAM initialises rel_pos to zero: give it values to test
            for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
                table.copy_(torch.randn(table.shape, generator=generator) * 0.5)
    x = torch.randn(batch, 3, 1024, 1024, generator=generator)
    with torch.inference_mode():
        expected = encoder(x)
        with fused_attention(encoder):
            got = encoder(x)
        again = encoder(x)
    assert [b.window_size for b in encoder.blocks] == [14, 0]
    assert got.shape == (batch, 256, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(again, expected)  # segment_anything's forward is back
    assert all("forward" not in vars(b.attn) for b in encoder.blocks)


# -- batched inference == SamPredictor ----------------------------------------------------------


def test_batch_matches_predictor_tiny(tiny):
    _assert_matches_predictor(tiny, _images(), BOXES)


def test_points_with_and_without_boxes_match_predictor(tiny):
    image = _images(1)[1]
    points = np.array([[60, 150], [120, 40], [30, 280]], dtype=np.float32)
    segmenter = SamSegmenter(tiny)
    embeddings = segmenter.embed([image])
    predictor = SamPredictor(tiny)

    with_boxes = segmenter.segment(embeddings, 0, BOXES[1][:2], points, k_components=None)
    expected, scores = _predictor_union(predictor, image, BOXES[1][:2], points)
    assert _iou(with_boxes.mask, expected) >= 0.999
    np.testing.assert_allclose(with_boxes.per_box_scores, scores, atol=1e-4)

    alone = segmenter.segment(embeddings, 0, np.zeros((0, 4)), points, k_components=None)
    masks, iou, _ = predictor.predict(point_coords=points, point_labels=np.ones(3, dtype=int), multimask_output=False)
    assert _iou(alone.mask, masks[0]) >= 0.999 and alone.per_box_scores.shape == (1,)
    np.testing.assert_allclose(alone.per_box_scores, iou, atol=1e-4)


def test_embeddings_are_reused_for_several_targets(tiny, tiny_embeddings):
    segmenter, embeddings = SamSegmenter(tiny), tiny_embeddings
    assert embeddings.features.shape == (3, 256, 64, 64) and len(embeddings) == 3
    assert embeddings.original_sizes == tuple(SIZES)
    assert embeddings.input_sizes == ((614, 1024), (1024, 578), (683, 1024))
    first = segmenter.segment(embeddings, 1, BOXES[1][:1], k_components=None)
    second = segmenter.segment(embeddings, 1, BOXES[1][1:2], k_components=None)
    both = segmenter.segment(embeddings, 1, BOXES[1][:2], k_components=None)
    np.testing.assert_array_equal(both.mask, first.mask | second.mask)


def test_k_largest_components_of_the_union(tiny, tiny_embeddings):
    segmenter, embeddings, boxes = SamSegmenter(tiny), tiny_embeddings, BOXES[1]
    union = segmenter.segment(embeddings, 1, boxes, k_components=None).mask
    assert largest_components(union, 2).sum() < union.sum()  # the union has more than 2 components
    for k in (1, 2):
        kept = segmenter.segment(embeddings, 1, boxes, k_components=k).mask
        np.testing.assert_array_equal(kept, largest_components(union, k))


def test_bad_inputs_are_refused(tiny):
    segmenter = SamSegmenter(tiny)
    with pytest.raises(ValueError, match="RGB uint8"):
        segmenter.embed([np.zeros((10, 10), dtype=np.uint8)])
    with pytest.raises(ValueError, match="RGB uint8"):
        segmenter.embed([np.zeros((10, 10, 3), dtype=np.float32)])
    embeddings = segmenter.embed(_images()[2:])
    with pytest.raises(ValueError, match="boxes_xyxy"):
        segmenter.segment(embeddings, 0, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(IndexError):
        segmenter.segment(embeddings, 1, BOXES[0])
    with pytest.raises(ConfigError, match="CUDA"):
        SamSegmenter(tiny, precision="bf16")
    with pytest.raises(ConfigError, match="variant"):
        load_sam("vit_x", None)


# -- checkpoints --------------------------------------------------------------------------------


def test_random_checkpoint_round_trip(tmp_path, tiny):
    path = write_random_sam(tmp_path / "sam_tiny.pth", "tiny", seed=0)
    state = torch.load(path, weights_only=True)
    assert type(state).__name__ == "OrderedDict" and all(isinstance(v, torch.Tensor) for v in state.values())
    assert list(state) == list(tiny.state_dict())
    # segment_anything's own loader reads it, as it reads sam_vit_b_01ec64.pth
    _build_sam(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=[1],
        checkpoint=str(path),
    )
    loaded = load_sam("tiny", path)
    images = _images()[:1]
    a = _segment_each(SamSegmenter(tiny), images, BOXES[:1], k_components=1)
    b = _segment_each(SamSegmenter(loaded), images, BOXES[:1], k_components=1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.mask, y.mask)
        np.testing.assert_array_equal(x.per_box_scores, y.per_box_scores)
    assert not torch.equal(random_sam("tiny", seed=1).mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight)


class _Payload:
    """Unpickling this runs code (touches a file): a checkpoint must never be able to do that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "code-ran"
    state = dict(random_sam("tiny", seed=0).state_dict())
    state["extra"] = _Payload(marker)
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"evil\.pth"):
        load_sam("tiny", path)
    assert not marker.exists()


def test_load_refuses_missing_unexpected_and_misshaped_keys(tmp_path):
    good = dict(random_sam("tiny", seed=0).state_dict())

    missing = dict(good)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"missing\.pth.*1 missing keys \(mask_decoder\.iou_token\.weight\)"):
        load_sam("tiny", tmp_path / "missing.pth")

    torch.save({**good, "head.weight": torch.zeros(2)}, tmp_path / "unexpected.pth")
    with pytest.raises(ConfigError, match=r"unexpected\.pth.*1 unexpected keys \(head\.weight\)"):
        load_sam("tiny", tmp_path / "unexpected.pth")

    torch.save({**good, "mask_decoder.iou_token.weight": torch.zeros(1, 8)}, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match=r"shape\.pth.*1 shape mismatches"):
        load_sam("tiny", tmp_path / "shape.pth")

    with pytest.raises(ConfigError, match=r"nowhere\.pth: no such"):
        load_sam("tiny", tmp_path / "nowhere.pth")

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match=r"list\.pth: expected a state dict"):
        load_sam("tiny", tmp_path / "list.pth")


# -- real size ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_matches_predictor_vit_b():
    _assert_matches_predictor(random_sam("vit_b", seed=0), _images(), BOXES)
