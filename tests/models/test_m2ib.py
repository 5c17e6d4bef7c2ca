"""M2IB saliency: the fast path gives the reference loop's map, batched or not, seeded (tiny model;
BiomedCLIP size is slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcs_batch.models.m2ib import (
    M2IBSettings,
    m2ib_from_prefix,
    m2ib_saliency,
    vision_prefix,
)
from mcs_batch.seeding import torch_generator

PROMPTS = (("a lung",), ("a breast tumor",), ("a brain tumor", "glioma in the brain"))
MAP_TOLERANCE = 1e-4  # fast vs reference, after min-max normalisation


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model's ops are small: on a shared 2-core machine, several threads per op mostly wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(clip, **overrides) -> M2IBSettings:
    # The tiny ViT has 6 blocks: bottleneck block 3 (two blocks after it, as 9 of 12 leaves).
    return M2IBSettings(**{"layer": clip.vision_layers // 2, **overrides})


def _images(clip, n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (180 + 20 * i, 240, 3), dtype=np.uint8) for i in range(n)]
    pixels, _ = clip.to_clip_input(images, "pad")
    return pixels


def _targets(clip, prompts=PROMPTS) -> torch.Tensor:
    return torch.stack([clip.encode_prompts(p) for p in prompts])


def _generators(n: int, seed: int = 0, case: str = "case") -> list[torch.Generator]:
    return [torch_generator(seed, case, i) for i in range(n)]


# -- fast == reference --------------------------------------------------------------------------------


def test_fast_batch_matches_reference_one_by_one(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    images, targets = _images(clip, 3), _targets(clip)
    fast = m2ib_saliency(visual, images, targets, _generators(3), settings)
    for i in range(3):
        ref = m2ib_saliency(
            visual, images[i : i + 1], targets[i : i + 1], _generators(3)[i : i + 1], settings, mode="reference"
        )
        assert (fast[i] - ref[0]).abs().max().item() < MAP_TOLERANCE
    # The targets differ, so the maps do too (the text matters).
    same_noise = [torch_generator(0, "case", 0) for _ in range(3)]
    same_image = m2ib_saliency(visual, images[:1].expand(3, -1, -1, -1), targets, same_noise, settings)
    assert (same_image[0] - same_image[1]).abs().max().item() > 1e-3


def test_reference_with_text_re_encoded_each_step_matches_fast(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    prompts = ("a lung", "a breast tumor")
    images, targets = _images(clip, 2, seed=1), _targets(clip, [(p,) for p in prompts])
    calls = []

    def text_encoder(i: int) -> torch.Tensor:
        calls.append(i)
        assert torch.is_grad_enabled()
        return clip.text_encoder([prompts[i]] * settings.samples)  # [samples, D], not normalised

    ref = m2ib_saliency(visual, images, targets, _generators(2), settings, mode="reference", text_encoder=text_encoder)
    fast = m2ib_saliency(visual, images, targets, _generators(2), settings)
    assert calls == [0] * settings.steps + [1] * settings.steps
    assert (fast - ref).abs().max().item() < MAP_TOLERANCE


@pytest.mark.parametrize("where", ["first", "last"])
def test_fast_matches_reference_at_the_first_and_last_block(tiny_biomedclip, where):
    clip = tiny_biomedclip
    layer = 0 if where == "first" else clip.vision_layers - 1  # last: no block after the bottleneck
    visual, settings = clip.model.visual, _settings(clip, layer=layer, steps=4, samples=3)
    images, targets = _images(clip, 2), _targets(clip)[:2]
    fast = m2ib_saliency(visual, images, targets, _generators(2), settings)
    ref = m2ib_saliency(visual, images, targets, _generators(2), settings, mode="reference")
    assert (fast - ref).abs().max().item() < MAP_TOLERANCE


def test_batch_equals_single_images(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    images, targets, gens = _images(clip, 3), _targets(clip), _generators(3)
    batch = m2ib_saliency(visual, images, targets, gens, settings)
    for i in range(3):
        single = m2ib_saliency(visual, images[i : i + 1], targets[i : i + 1], _generators(3)[i : i + 1], settings)
        assert (batch[i] - single[0]).abs().max().item() < 1e-5


def test_prefix_is_shared_by_several_targets_on_one_image(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    image, targets = _images(clip, 1), _targets(clip)
    R = vision_prefix(visual, image, settings)
    assert R.shape == (1, 197, clip.vision_width) and R.dtype == torch.float32 and not R.requires_grad
    maps = m2ib_from_prefix(
        visual, R.expand(3, -1, -1), targets, [torch_generator(0, "c", 0) for _ in range(3)], settings
    )
    for i in range(3):
        alone = m2ib_saliency(visual, image, targets[i : i + 1], [torch_generator(0, "c", 0)], settings)
        assert (maps[i] - alone[0]).abs().max().item() < 1e-5


def test_prefix_is_the_output_of_block_layer(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    images = _images(clip, 2)
    seen = {}
    handle = visual.trunk.blocks[settings.layer].register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        with torch.no_grad():
            visual(images)
    finally:
        handle.remove()
    torch.testing.assert_close(vision_prefix(visual, images, settings), seen["out"], rtol=0, atol=1e-5)


# -- seeding, output contract ---------------------------------------------------------------------------


def test_deterministic_with_the_same_seeds_different_with_others(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    images, targets = _images(clip, 3), _targets(clip)
    a = m2ib_saliency(visual, images, targets, _generators(3, seed=7), settings)
    b = m2ib_saliency(visual, images, targets, _generators(3, seed=7), settings)
    c = m2ib_saliency(visual, images, targets, _generators(3, seed=8), settings)
    assert torch.equal(a, b)
    for i in range(3):
        assert (a[i] - c[i]).abs().max().item() > 1e-3


def test_both_modes_draw_the_same_noise(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    images, targets = _images(clip, 1), _targets(clip)[:1]
    for mode in ("fast", "reference"):
        g = torch_generator(3, "case", 0)
        m2ib_saliency(visual, images, targets, [g], settings, mode=mode)
        expected = torch_generator(3, "case", 0)
        for _ in range(settings.steps):
            torch.randn((settings.samples, 197, clip.vision_width), generator=expected)
        assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=expected)), mode


def test_output_shape_dtype_range(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip, steps=3, samples=2)
    out = m2ib_saliency(visual, _images(clip, 2), _targets(clip)[:2], _generators(2), settings)
    assert out.shape == (2, 224, 224) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.isfinite(out).all()
    for i in range(2):
        assert out[i].min().item() == 0.0 and out[i].max().item() == 1.0


def test_constant_map_is_all_zeros(tiny_biomedclip):
    # R = 0 and no update: alpha, hence KL, is the same everywhere.
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip, steps=1)
    R = torch.zeros(2, 197, clip.vision_width)
    out = m2ib_from_prefix(visual, R, _targets(clip)[:2], _generators(2), settings)
    assert out.shape == (2, 224, 224) and torch.equal(out, torch.zeros_like(out))


def test_only_alpha_gets_gradients_in_the_fast_path_and_model_state_is_restored(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip, steps=2, samples=2)
    flags = {}
    first_after = visual.trunk.blocks[settings.layer + 1]  # the first block that sees Z

    def hook(module, inputs, output):
        flags.setdefault(mode, set()).add(all(p.requires_grad for p in visual.parameters()))

    last_block_calls = {"fast": 0, "reference": 0}

    def count(module, inputs, output):
        last_block_calls[mode] += 1

    before = [p.requires_grad for p in visual.parameters()]
    handles = [
        first_after.register_forward_hook(hook),
        visual.trunk.blocks[-1].register_forward_hook(count),
    ]
    try:
        for mode in ("fast", "reference"):
            m2ib_saliency(visual, _images(clip, 1), _targets(clip)[:1], _generators(1), settings, mode=mode)
    finally:
        for handle in handles:
            handle.remove()
    # Token pooling reads only the CLS token: the fast path computes the last block for it alone.
    assert last_block_calls == {"fast": 0, "reference": settings.steps}
    # The fast path freezes every weight; the reference computes every weight's gradient, as the
    # public code does.
    assert flags == {"fast": {False}, "reference": {True}}
    assert [p.requires_grad for p in visual.parameters()] == before
    assert all(p.grad is None for p in visual.parameters()) and not visual.training


# -- bad input ------------------------------------------------------------------------------------------


def test_layer_out_of_range_is_a_clear_value_error(tiny_biomedclip):
    clip = tiny_biomedclip
    visual = clip.model.visual
    images, targets = _images(clip, 1), _targets(clip)[:1]
    with pytest.raises(ValueError, match=r"layer 6: the image tower has blocks 0\.\.5"):
        m2ib_saliency(visual, images, targets, _generators(1), M2IBSettings(layer=6))
    with pytest.raises(ValueError, match="layer 9"):
        vision_prefix(visual, images)  # BiomedCLIP's default layer 9 on the 6-block tiny ViT
    with pytest.raises(ValueError, match="layer -1"):
        M2IBSettings(layer=-1)


def test_bad_settings_and_arguments(tiny_biomedclip):
    clip = tiny_biomedclip
    visual, settings = clip.model.visual, _settings(clip)
    images, targets = _images(clip, 2), _targets(clip)[:2]
    with pytest.raises(ValueError, match="precision"):
        M2IBSettings(precision="fp8")
    with pytest.raises(ValueError, match="steps"):
        M2IBSettings(steps=0)
    with pytest.raises(ValueError, match="generators"):
        m2ib_saliency(visual, images, targets, _generators(1), settings)
    with pytest.raises(ValueError, match="text_embeddings"):
        m2ib_saliency(visual, images, targets[:1], _generators(2), settings)
    with pytest.raises(ValueError, match="images"):
        m2ib_saliency(visual, images[:, :, :160, :160], targets, _generators(2), settings)
    with pytest.raises(ValueError, match="reference"):
        m2ib_saliency(visual, images, targets, _generators(2), settings, text_encoder=lambda i: targets[i])
    with pytest.raises(ValueError, match="mode"):
        m2ib_saliency(visual, images, targets, _generators(2), settings, mode="quick")
    with pytest.raises(TypeError, match="TimmModel"):
        m2ib_saliency(clip.model, images, targets, _generators(2), settings)


def test_half_precision_needs_cuda(tiny_biomedclip):
    clip = tiny_biomedclip
    settings = _settings(clip, precision="bf16")
    assert settings.precision == "bf16"
    with pytest.raises(ValueError, match="CUDA"):
        m2ib_saliency(clip.model.visual, _images(clip, 1), _targets(clip)[:1], _generators(1), settings)


@pytest.mark.gpu  # deselected by `make test` (no GPU in CI); run with `pytest -m gpu` on a GPU machine
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cuda_is_close_to_fp32(tiny_biomedclip, precision):
    import copy

    clip = tiny_biomedclip
    visual = copy.deepcopy(clip.model.visual).cuda()
    images, targets = _images(clip, 2).cuda(), _targets(clip)[:2].cuda()
    full = m2ib_saliency(visual, images, targets, _generators(2), _settings(clip))
    half = m2ib_saliency(visual, images, targets, _generators(2), _settings(clip, precision=precision))
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert (half - full).abs().mean().item() < 0.05


# -- BiomedCLIP size --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_biomedclip_size_fast_matches_reference(tmp_path):
    from mcs_batch.models.biomedclip import load_biomedclip
    from mcs_batch.models.tiny import write_tiny_biomedclip

    clip = load_biomedclip(write_tiny_biomedclip(tmp_path / "base", seed=0, size="base"))
    visual, settings = clip.model.visual, M2IBSettings()
    images, targets = _images(clip, 2), _targets(clip)[:2]
    fast = m2ib_saliency(visual, images, targets, _generators(2), settings)
    ref = m2ib_saliency(visual, images[:1], targets[:1], _generators(2)[:1], settings, mode="reference")
    assert (fast[0] - ref[0]).abs().max().item() < MAP_TOLERANCE
    single = m2ib_saliency(visual, images[1:], targets[1:], _generators(2)[1:], settings)
    assert (fast[1] - single[0]).abs().max().item() < 1e-5
