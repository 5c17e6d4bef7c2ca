"""HF-port <-> open_clip BiomedCLIP weights: exact round trips, and a model imported from HF weights."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from mcs_batch.models.biomedclip import load_biomedclip
from mcs_batch.models.hf_import import (
    IMPORT_RECORD,
    hf_to_open_clip,
    import_biomedclip_hf,
    open_clip_to_hf,
)
from mcs_batch.models.open_clip_folder import read_marker
from mcs_batch.models.tiny import write_tiny_biomedclip
from mcs_batch.models.weights import WeightsError, load_state_dict, sha256_file

PROMPTS = ["a lung", "a breast tumor", "an enhancing brain tumor on mri"]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (120, 200, 3), dtype=np.uint8), rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]


def _embeddings(clip):
    pixels, _ = clip.to_clip_input(_images(), "pad")
    with torch.no_grad():
        return clip.image_encoder(pixels), clip.text_encoder(PROMPTS)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _check_hf_layout(hf: dict, vision_layers: int, text_layers: int, width: int) -> None:
    """The key layout of the HF port's BiomedCLIPModel (see the mcs_batch.models.hf_import docstring)."""
    tops = Counter(k.split(".")[0] for k in hf)
    assert set(tops) == {"vision_model", "text_model", "visual_projection", "text_projection", "logit_scale"}
    for i in range(vision_layers):
        layer = {k for k in hf if k.startswith(f"vision_model.encoder.layers.{i}.")}
        assert len(layer) == 16  # q/k/v/out_proj, mlp.fc1/fc2, layer_norm1/2: weight + bias each
    for i in range(text_layers):
        assert len([k for k in hf if k.startswith(f"text_model.encoder.layers.{i}.")]) == 16
    for which in "qkv":
        assert tuple(hf[f"vision_model.encoder.layers.0.self_attn.{which}_proj.weight"].shape) == (width, width)
        assert tuple(hf[f"vision_model.encoder.layers.0.self_attn.{which}_proj.bias"].shape) == (width,)
    assert tuple(hf["vision_model.embeddings.class_embedding"].shape) == (width,)
    assert hf["vision_model.embeddings.position_embedding.weight"].ndim == 2
    assert {"text_projection.fc1.weight", "text_projection.fc2.weight", "visual_projection.weight"} <= set(hf)
    assert "vision_model.post_layernorm.weight" in hf and "text_model.embeddings.token_embedding.weight" in hf


def test_tiny_round_trip_is_exact(tiny_biomedclip_folder):
    original = load_state_dict(tiny_biomedclip_folder / "open_clip_pytorch_model.bin")
    hf = open_clip_to_hf(original)
    _check_hf_layout(hf, vision_layers=6, text_layers=2, width=64)
    # the fused qkv is q, k, v stacked along the output dimension
    qkv = original["visual.trunk.blocks.2.attn.qkv.weight"]
    assert torch.equal(hf["vision_model.encoder.layers.2.self_attn.k_proj.weight"], qkv[64:128])
    assert torch.equal(
        hf["vision_model.encoder.layers.2.self_attn.v_proj.bias"], original["visual.trunk.blocks.2.attn.qkv.bias"][128:]
    )
    assert torch.equal(
        hf["text_model.encoder.layers.1.self_attn.q_proj.weight"],
        original["text.transformer.encoder.layer.1.attention.self.query.weight"],
    )
    _assert_same_tensors(hf_to_open_clip(hf), original)


def test_imported_model_gives_identical_embeddings(tmp_path, tiny_biomedclip_folder, tiny_biomedclip):
    hf = open_clip_to_hf(load_state_dict(tiny_biomedclip_folder / "open_clip_pytorch_model.bin"))
    src = tmp_path / "pytorch_model.bin"
    torch.save(hf, src)
    dst = import_biomedclip_hf(src, tmp_path / "imported", base_folder=tiny_biomedclip_folder)
    assert dst == tmp_path / "imported"
    names = {p.name for p in dst.iterdir()}
    assert {"open_clip_config.json", "open_clip_pytorch_model.bin", "config.json", "vocab.txt"} <= names
    assert read_marker(dst)["tiny"] is True  # a tiny architecture cannot hold real weights
    record = json.loads((dst / IMPORT_RECORD).read_text())
    assert record["source_sha256"] == sha256_file(src) and record["layout"] == "hf"
    config = json.loads((dst / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == str(dst)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []

    imported = load_biomedclip(dst)
    image_a, text_a = _embeddings(tiny_biomedclip)
    image_b, text_b = _embeddings(imported)
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)
    assert torch.equal(imported.encode_prompts(PROMPTS), tiny_biomedclip.encode_prompts(PROMPTS))


def test_in_memory_weights_at_224_import_too(tmp_path, tiny_biomedclip_folder, tiny_biomedclip):
    # the loaded tiny ViT runs at 224 (197 position embeddings); the folder's file has test_vit's 101
    hf = open_clip_to_hf(tiny_biomedclip.model.state_dict())
    assert tuple(hf["vision_model.embeddings.position_embedding.weight"].shape) == (197, 64)
    src = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.items()}, str(src))
    imported = load_biomedclip(import_biomedclip_hf(src, tmp_path / "imported", base_folder=tiny_biomedclip_folder))
    image_a, text_a = _embeddings(tiny_biomedclip)
    image_b, text_b = _embeddings(imported)
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)


def test_benign_buffers_are_dropped_and_unknown_keys_refused(tiny_biomedclip_folder):
    hf = open_clip_to_hf(load_state_dict(tiny_biomedclip_folder / "open_clip_pytorch_model.bin"))
    with_buffers = dict(hf)
    with_buffers["text_model.embeddings.position_ids"] = torch.arange(512)[None]
    with_buffers["vision_model.embeddings.position_ids"] = torch.arange(197)[None]
    assert sorted(hf_to_open_clip(with_buffers)) == sorted(hf_to_open_clip(hf))
    with pytest.raises(WeightsError, match=r"1 keys do not belong to the HF BiomedCLIP port layout.*classifier"):
        hf_to_open_clip({**hf, "classifier.weight": torch.zeros(2)})
    partial = {k: v for k, v in hf.items() if k != "vision_model.encoder.layers.4.self_attn.v_proj.bias"}
    with pytest.raises(WeightsError, match="vision layer 4: bias of v_proj missing"):
        hf_to_open_clip(partial)
    with pytest.raises(WeightsError, match="open_clip BiomedCLIP layout"):
        open_clip_to_hf({"visual.conv1.weight": torch.zeros(1)})


def test_import_refuses_bad_inputs(tmp_path, tiny_biomedclip_folder):
    hf = open_clip_to_hf(load_state_dict(tiny_biomedclip_folder / "open_clip_pytorch_model.bin"))
    src = tmp_path / "hf.bin"
    torch.save(hf, src)
    (tmp_path / "exists").mkdir()
    with pytest.raises(WeightsError, match="already exists"):
        import_biomedclip_hf(src, tmp_path / "exists", base_folder=tiny_biomedclip_folder)
    with pytest.raises(WeightsError, match="not an open_clip folder"):
        import_biomedclip_hf(src, tmp_path / "out", base_folder=tmp_path)
    # weights of another architecture: a text projection of the wrong shape
    bad = dict(hf)
    bad["text_projection.fc2.weight"] = torch.zeros(16, 32)
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(WeightsError, match=r"bad\.bin: does not fit the architecture of"):
        import_biomedclip_hf(tmp_path / "bad.bin", tmp_path / "out", base_folder=tiny_biomedclip_folder)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.slow
def test_base_round_trip_and_import(tmp_path):
    base = write_tiny_biomedclip(tmp_path / "base", seed=3, size="base")
    original = load_state_dict(base / "open_clip_pytorch_model.bin")
    hf = open_clip_to_hf(original)
    _check_hf_layout(hf, vision_layers=12, text_layers=12, width=768)
    assert tuple(hf["vision_model.embeddings.position_embedding.weight"].shape) == (197, 768)
    assert tuple(hf["text_projection.fc1.weight"].shape) == (640, 768)
    assert tuple(hf["visual_projection.weight"].shape) == (512, 768)
    _assert_same_tensors(hf_to_open_clip(hf), original)
    src = tmp_path / "pytorch_model.bin"
    torch.save(hf, src)
    del original, hf
    dst = import_biomedclip_hf(src, tmp_path / "imported", base_folder=base)
    assert read_marker(dst) is None  # a BiomedCLIP-size import may hold real weights: no tiny marker
    image_a, text_a = _embeddings(load_biomedclip(base))
    image_b, text_b = _embeddings(load_biomedclip(dst))
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)
