"""BiomedCLIP wrapper: loading, prompt ensembling, exact CLIP geometry (tiny model; base is slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mcs_batch.models.biomedclip import (
    ClipGeometry,
    ResizeMode,
    ensemble_prompts,
    load_biomedclip,
    map_to_image,
    resize_for_clip,
    to_clip_input,
)
from mcs_batch.models.open_clip_folder import CLIP_MEAN, CLIP_STD, read_marker
from mcs_batch.models.tiny import write_tiny_biomedclip
from mcs_batch.models.weights import WeightsError, fetch, sha256_file

# A 300 x 180 (W x H) image with a bright 60 x 60 rectangle at rows 40..99, columns 200..259.
H, W = 180, 300
RECT = (40, 100, 200, 260)  # row0, row1 (exclusive), col0, col1 (exclusive)


def _rect_image() -> np.ndarray:
    image = np.zeros((H, W, 3), np.uint8)
    r0, r1, c0, c1 = RECT
    image[r0:r1, c0:c1] = 255
    return image


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


# -- the tiny model -----------------------------------------------------------------------------------


def test_tiny_folder_has_the_open_clip_local_dir_layout(tiny_biomedclip_folder):
    names = {p.name for p in tiny_biomedclip_folder.iterdir()}
    assert {"open_clip_config.json", "open_clip_pytorch_model.bin", "config.json", "vocab.txt"} <= names
    assert {"tokenizer_config.json", "mcs_batch_model.json"} <= names
    config = json.loads((tiny_biomedclip_folder / "open_clip_config.json").read_text())
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert vision == {
        "timm_model_name": "test_vit",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,
    }
    assert text["hf_model_name"] == text["hf_tokenizer_name"] == str(tiny_biomedclip_folder)
    assert (text["hf_proj_type"], text["hf_pooler_type"]) == ("mlp", "cls_last_hidden_state_pooler")
    assert text["context_length"] == 256
    assert config["preprocess_cfg"] == {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    marker = read_marker(tiny_biomedclip_folder)
    assert marker["tiny"] is True and marker["seed"] == 0 and marker["vision_layers"] == 6
    vocab = (tiny_biomedclip_folder / "vocab.txt").read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "tumor" in vocab


def test_tiny_weights_are_a_function_of_the_seed(tmp_path, tiny_biomedclip_folder):
    weights = "open_clip_pytorch_model.bin"
    again = write_tiny_biomedclip(tmp_path / "again", seed=0)
    other = write_tiny_biomedclip(tmp_path / "other", seed=1)
    assert sha256_file(again / weights) == sha256_file(tiny_biomedclip_folder / weights)
    assert sha256_file(other / weights) != sha256_file(again / weights)
    assert (other / "vocab.txt").read_bytes() == (again / "vocab.txt").read_bytes()


def test_load_tiny_describes_the_model(tiny_biomedclip, tiny_biomedclip_folder):
    clip = tiny_biomedclip
    assert (clip.embed_dim, clip.vision_layers, clip.vision_width, clip.context_length) == (32, 6, 64, 256)
    assert clip.tiny is True and clip.image_size == 224
    assert clip.mean == CLIP_MEAN and clip.std == CLIP_STD
    weights = tiny_biomedclip_folder / "open_clip_pytorch_model.bin"
    assert clip.files["open_clip_pytorch_model.bin"] == sha256_file(weights)
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    n_params = sum(p.numel() for p in clip.model.parameters())
    assert 250_000 < n_params < 450_000
    # test_vit is natively 160 x 160: it runs at 224, i.e. 1 + 14 x 14 = 197 tokens, like BiomedCLIP.
    assert tuple(clip.model.visual.trunk.pos_embed.shape) == (1, 197, 64)
    with torch.no_grad():
        tokens = clip.model.visual.trunk.forward_features(torch.zeros(2, 3, 224, 224))
    assert tuple(tokens.shape) == (2, 197, 64)


def test_loaded_weights_are_the_files_weights(tiny_biomedclip, tiny_biomedclip_folder):
    saved = torch.load(tiny_biomedclip_folder / "open_clip_pytorch_model.bin", weights_only=True)
    live = tiny_biomedclip.model.state_dict()
    for name in ("text.proj.0.weight", "visual.head.proj.weight", "visual.trunk.blocks.3.attn.qkv.bias"):
        assert torch.equal(live[name], saved[name])


def test_tokenizer_wraps_cls_sep_and_pads(tiny_biomedclip, tiny_biomedclip_folder):
    vocab = (tiny_biomedclip_folder / "vocab.txt").read_text().split("\n")
    ids = tiny_biomedclip.tokenize(["a lung tumor", "xyzzy"])
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (2, 256)
    assert ids[0, :5].tolist() == [2, vocab.index("a"), vocab.index("lung"), vocab.index("tumor"), 3]
    assert ids[0, 5:].eq(0).all()
    assert 1 not in ids[1].tolist()  # no [UNK]: single characters cover any lowercase word


def test_encode_prompts_is_the_normalised_mean_of_normalised_embeddings(tiny_biomedclip):
    prompts = ["a lung", "a chest x-ray showing the lungs", "bilateral lungs"]
    with torch.no_grad():
        features = tiny_biomedclip.text_encoder(prompts)
    assert tuple(features.shape) == (3, 32)
    manual = F.normalize(F.normalize(features, dim=-1).mean(0), dim=-1)
    target = tiny_biomedclip.encode_prompts(prompts)
    assert target.dtype == torch.float32 and tuple(target.shape) == (32,)
    assert torch.allclose(target, manual, atol=1e-6)
    assert target.norm().item() == pytest.approx(1.0, abs=1e-6)
    single = tiny_biomedclip.encode_prompts("a lung")
    assert torch.allclose(single, F.normalize(features[0], dim=-1), atol=1e-6)
    assert torch.allclose(tiny_biomedclip.encode_prompts(prompts[::-1]), target, atol=1e-6)
    assert torch.allclose(ensemble_prompts(features), manual, atol=1e-6)


def test_encode_prompts_is_cached_per_prompt_tuple(tiny_biomedclip, monkeypatch):
    prompts = ("cache me", "and me")
    first = tiny_biomedclip.encode_prompts(prompts)
    calls = []
    monkeypatch.setattr(tiny_biomedclip, "text_encoder", lambda p: calls.append(p))
    first.zero_()  # callers get a copy: mutating it does not touch the cache
    again = tiny_biomedclip.encode_prompts(list(prompts))
    assert calls == [] and again.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_bad_prompts_are_refused(tiny_biomedclip):
    for bad in ([], [""], ["ok", "  "]):
        with pytest.raises(ValueError, match="non-empty"):
            tiny_biomedclip.encode_prompts(bad)


def test_text_encoder_runs_with_gradients(tiny_biomedclip_folder):
    clip = load_biomedclip(tiny_biomedclip_folder)
    clip.model.requires_grad_(True)
    features = clip.text_encoder(["a lung", "a tumor"])
    target = ensemble_prompts(features)
    assert features.requires_grad and target.requires_grad
    target.sum().backward()
    grad = clip.model.text.transformer.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_image_encoder_batches_independently(tiny_biomedclip):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(3)]
    pixels, _ = tiny_biomedclip.to_clip_input(images)
    with torch.no_grad():
        batch = tiny_biomedclip.image_encoder(pixels)
        one = tiny_biomedclip.image_encoder(pixels[1:2])
    assert tuple(batch.shape) == (3, 32)
    assert torch.allclose(batch[1], one[0], atol=1e-5)


# -- loading errors -----------------------------------------------------------------------------------


def test_folder_without_weights_is_refused(tmp_path, tiny_biomedclip_folder):
    folder = shutil.copytree(tiny_biomedclip_folder, tmp_path / "no-weights")
    (folder / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(WeightsError, match="no weights file"):
        load_biomedclip(folder)


def test_a_file_is_not_a_model_folder(tiny_biomedclip_folder):
    with pytest.raises(WeightsError, match="needs a folder"):
        load_biomedclip(tiny_biomedclip_folder / "open_clip_pytorch_model.bin")


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_biomedclip_folder):
    folder = shutil.copytree(tiny_biomedclip_folder, tmp_path / "bad")
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    del state["text.proj.2.weight"]
    state["visual.extra.weight"] = torch.zeros(1)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"1 missing .*text\.proj\.2\.weight.*1 unexpected"):
        load_biomedclip(folder)


def test_text_tower_is_found_in_the_folder_wherever_the_config_points(tmp_path, tiny_biomedclip_folder):
    folder = shutil.copytree(tiny_biomedclip_folder, tmp_path / "moved")
    clip = load_biomedclip(folder)  # its config still names the original folder
    assert clip.folder == folder and clip.tiny


def test_missing_text_tower_config_of_an_unknown_tower_is_explained(tmp_path, tiny_biomedclip_folder):
    folder = shutil.copytree(tiny_biomedclip_folder, tmp_path / "no-bert-config")
    (folder / "config.json").unlink()
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "someone/unknown-bert"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"no config\.json for its text tower 'someone/unknown-bert'"):
        load_biomedclip(folder)


def test_load_from_a_fetched_record(tmp_path):
    record = fetch("tiny", cache_dir=tmp_path / "cache")
    clip = load_biomedclip(record)
    assert clip.uri == "tiny" and clip.tiny and clip.files == record.files
    assert clip.provenance()["tiny"] is True


# -- geometry -----------------------------------------------------------------------------------------


def test_geometry_of_pad_mode_centres_the_image():
    g = ClipGeometry.fit(H, W, "pad")
    assert (g.side, g.top, g.left, g.mode) == (300, 60, 0, ResizeMode.PAD)
    tall = ClipGeometry.fit(301, 100, "pad")
    assert (tall.side, tall.top, tall.left) == (301, 0, 100)
    assert ClipGeometry.fit(H, W, "resize").top == 0
    with pytest.raises(ValueError):
        ClipGeometry.fit(H, W, "crop")


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_rectangle_maps_back_onto_itself(mode):
    placed, geometry = resize_for_clip(_rect_image(), mode)
    assert placed.shape == (224, 224, 3) and placed.dtype == np.float32
    assert placed.min() >= 0 and placed.max() <= 255
    # where the rectangle lands in the CLIP input is where image_to_clip says it does
    r0, r1, c0, c1 = RECT
    top_left = geometry.image_to_clip(r0 - 0.5, c0 - 0.5)
    bottom_right = geometry.image_to_clip(r1 - 0.5, c1 - 0.5)
    got = _bbox(placed[..., 0] > 127.5)
    want = (top_left[0] + 0.5, bottom_right[0] + 0.5, top_left[1] + 0.5, bottom_right[1] + 0.5)
    assert np.allclose(got, want, atol=1.0), (got, want)
    # a map that is the CLIP input itself maps back onto the rectangle
    saliency = placed.mean(axis=2) / 255.0
    back = map_to_image(saliency, geometry)
    assert back.shape == (H, W) and back.dtype == np.float32
    assert np.allclose(_bbox(back > 0.5), RECT, atol=1)
    assert back[r0 + 5 : r1 - 5, c0 + 5 : c1 - 5].min() > 0.95
    assert back[:, :150].max() < 0.05


def test_pad_mode_maps_the_padding_out():
    placed, geometry = resize_for_clip(np.full((H, W, 3), 200, np.uint8), "pad")
    pad_rows = round(geometry.top * 224 / geometry.side)  # 60 of 300 rows -> ~45 of 224
    assert placed[: pad_rows - 1].max() == 0 and placed[-(pad_rows - 1) :].max() == 0
    assert placed[pad_rows + 1 : 224 - pad_rows - 1].min() == 200
    only_padding = np.zeros((224, 224), np.float32)
    only_padding[:pad_rows] = 1.0
    only_padding[224 - pad_rows :] = 1.0
    back = map_to_image(only_padding, geometry)
    assert back.shape == (H, W)
    assert back[2:-2].max() < 1e-6  # nothing of the padding lands inside the image
    assert back.mean() < 0.02


def test_to_clip_input_normalises_with_the_method_mean_and_std():
    pixels, geometries = to_clip_input([np.full((224, 224, 3), 128, np.uint8), _rect_image()], "resize")
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (2, 3, 224, 224)
    for c in range(3):
        expected = (128 / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(pixels[0, c], torch.full((224, 224), expected), atol=1e-6)
    assert [(g.height, g.width) for g in geometries] == [(224, 224), (H, W)]


def test_a_224_square_image_is_not_resampled():
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    placed, _ = resize_for_clip(image, "resize")
    assert np.array_equal(placed, image.astype(np.float32))
    ident = np.random.default_rng(2).random((224, 224)).astype(np.float32)
    assert np.array_equal(map_to_image(ident, ClipGeometry.fit(224, 224, "pad")), ident)


def test_grey_and_bad_images():
    placed, _ = resize_for_clip(np.full((10, 20), 7, np.uint8), "pad")
    assert placed.shape == (224, 224, 3)
    with pytest.raises(ValueError, match="uint8"):
        resize_for_clip(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        resize_for_clip(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="224"):
        map_to_image(np.zeros((100, 100)), ClipGeometry.fit(H, W, "resize"))


# -- BiomedCLIP size (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_base_size_is_biomedclip_size(tmp_path):
    folder = write_tiny_biomedclip(tmp_path / "base", seed=0, size="base")
    clip = load_biomedclip(folder)
    n_params = sum(p.numel() for p in clip.model.parameters())
    assert 195e6 < n_params < 197e6
    assert (clip.embed_dim, clip.vision_layers, clip.vision_width, clip.context_length) == (512, 12, 768, 256)
    state = clip.model.state_dict()
    assert tuple(state["text.proj.0.weight"].shape) == (640, 768)
    assert tuple(state["text.proj.2.weight"].shape) == (512, 640)
    assert tuple(state["text.transformer.embeddings.word_embeddings.weight"].shape) == (30522, 768)
    assert tuple(state["visual.trunk.pos_embed"].shape) == (1, 197, 768)
    target = clip.encode_prompts(["a breast tumor", "a hypoechoic mass"])
    assert tuple(target.shape) == (512,)
    # Without the text tower's config.json (as in the hub folder), the published BERT-base config is used.
    (folder / "config.json").unlink()
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    again = load_biomedclip(folder)
    assert torch.allclose(again.encode_prompts(["a breast tumor", "a hypoechoic mass"]), target, atol=1e-5)
