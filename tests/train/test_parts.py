"""Pure parts of fine-tuning: retrieval metrics, schedule, towers, caption filters, hash split, config."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from mcs_batch.errors import ConfigError
from mcs_batch.models.biomedclip import load_biomedclip, to_clip_input
from mcs_batch.models.tiny import write_tiny_biomedclip
from mcs_batch.testdata.pairs import caption_for, shape_image
from mcs_batch.train.config import PairsConfig, load_finetune_config
from mcs_batch.train.optim import lr_factor, parameter_groups, select_trainable, set_train_mode, steps_per_epoch
from mcs_batch.train.pairs import (
    DROPPED_NO_IMAGE,
    DROPPED_SHORT,
    VAL,
    clean_caption,
    listing_format,
    normalise_pixels,
    prepare_batch,
    resolve_uri,
    split_of,
)
from mcs_batch.train.retrieval import retrieval_metrics

REPO = Path(__file__).resolve().parents[2]


# -- retrieval -----------------------------------------------------------------------------------------


def test_retrieval_top1_top2_by_hand():
    images = torch.eye(3)
    # text 0 matches image 0; text 1 is closest to image 2 then image 1; text 2 is closest to image 0, then 2
    texts = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.5, 0.9], [0.9, 0.0, 0.5]])
    m = retrieval_metrics(images, texts, ["a", "b", "c"])
    # image -> text: image 0 -> text 0 (hit); image 1 -> text 1 (hit); image 2 -> text 1, then text 2 (top-2)
    assert m["i2t_top1"] == pytest.approx(2 / 3) and m["i2t_top2"] == pytest.approx(1.0)
    # text -> image: text 0 -> image 0 (hit); text 1 -> image 2, then 1 (top-2); text 2 -> image 0, then 2
    assert m["t2i_top1"] == pytest.approx(1 / 3) and m["t2i_top2"] == pytest.approx(1.0)
    assert m["n"] == 3 and m["chance_top1"] == pytest.approx(1 / 3)


def test_retrieval_counts_identical_captions_as_interchangeable():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.02], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 share a caption
    m = retrieval_metrics(images, texts, ["red", "red", "blue"])
    assert m["i2t_top1"] == 1.0 and m["t2i_top1"] == 1.0
    assert m["chance_top1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    strict = retrieval_metrics(images, texts, ["red 0", "red 1", "blue"])  # unique captions: index matching
    assert strict["i2t_top1"] < 1.0


def test_retrieval_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="as many"):
        retrieval_metrics(torch.eye(3), torch.eye(3), ["a", "b"])


# -- schedule and towers --------------------------------------------------------------------------------


def test_warmup_then_cosine():
    f = [lr_factor(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warm-up
    assert f[4] == pytest.approx(1.0)  # peak right after warm-up
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert f[14] == pytest.approx(0.1) and f[19] == pytest.approx(0.1)  # floor, then flat
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))


def test_steps_per_epoch_follow_the_equal_split():
    assert steps_per_epoch(101, num_workers=2, worker_batch_size=16) == 4  # 50 pairs each: 16+16+16+2
    assert steps_per_epoch(96, num_workers=2, worker_batch_size=16) == 3


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return load_biomedclip(write_tiny_biomedclip(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize(
    ("towers", "trained", "frozen"),
    [
        ("both", ["visual.trunk.blocks.0.attn.qkv.weight", "text.proj.0.weight"], ["logit_scale"]),
        ("vision", ["visual.trunk.blocks.0.attn.qkv.weight", "visual.head.proj.weight"], ["text.proj.0.weight"]),
        ("text", ["text.transformer.embeddings.word_embeddings.weight"], ["visual.head.proj.weight"]),
        ("projection", ["visual.head.proj.weight", "text.proj.2.weight"], ["visual.trunk.blocks.0.attn.qkv.weight"]),
    ],
)
def test_tower_selection(tiny_clip, towers, trained, frozen):
    model = tiny_clip.model
    names = select_trainable(model, towers)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in trained) and all(n in names for n in trained)
    assert not any(params[n].requires_grad for n in frozen) and not params["logit_scale"].requires_grad
    set_train_mode(model, towers)
    assert model.visual.trunk.training == (towers in ("both", "vision"))
    assert model.text.transformer.training == (towers in ("both", "text"))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    model.eval().requires_grad_(False)


def test_worker_normalisation_is_to_clip_input(tiny_clip):
    from mcs_batch.models.biomedclip import resize_for_clip

    rng = np.random.default_rng(0)
    image = shape_image("green", "square", "right", size=50, rng=rng)
    placed, _ = resize_for_clip(image, "resize", size=224)
    ours = normalise_pixels(torch.from_numpy(placed.astype(np.uint8)[None]), mean=tiny_clip.mean, std=tiny_clip.std)
    reference, _ = to_clip_input([image], "resize")
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


# -- listing rows ------------------------------------------------------------------------------------


def test_split_is_a_stable_hash_of_the_image_uri():
    digest = hashlib.sha256(b"salt\ns3://b/x.png").digest()
    expected = VAL if int.from_bytes(digest[:8], "big") / 2**64 < 0.3 else "train"
    assert split_of("s3://b/x.png", val_fraction=0.3, salt="salt") == expected
    uris = [f"s3://bucket/img/{i}.png" for i in range(2000)]
    splits = [split_of(u, val_fraction=0.2, salt="a") for u in uris]
    assert 0.17 < splits.count(VAL) / len(uris) < 0.23
    assert splits != [split_of(u, val_fraction=0.2, salt="b") for u in uris]  # the salt draws another split
    assert all(split_of(u, val_fraction=0.0, salt="a") == "train" for u in uris)


def test_prepare_rows_cleans_filters_resolves_and_splits():
    import pandas as pd

    cfg = PairsConfig(listing=("x",), image_column="img", caption_column="text", val_fraction=0.5, split_salt="s")
    batch = pd.DataFrame(
        {
            "img": ["a/1.png", "s3://other/2.dcm", None, "/abs/4.png", "5.png"],
            "text": ["  a bright   round\nmass ", "a lesion on the left", "no image here", "lung", None],
        }
    )
    out = prepare_batch(batch, cfg=cfg, listing_dir="s3://bucket/listings")  # min 8 characters, 2 words
    assert list(out["image_uri"]) == ["s3://bucket/listings/a/1.png", "s3://other/2.dcm", "", "/abs/4.png",
                                      "s3://bucket/listings/5.png"]  # fmt: skip
    assert out["caption"][0] == "a bright round mass"
    assert list(out["split"][2:]) == [DROPPED_NO_IMAGE, DROPPED_SHORT, DROPPED_SHORT]
    assert list(out["split"][:2]) == [split_of(u, val_fraction=0.5, salt="s") for u in out["image_uri"][:2]]


def test_small_helpers():
    assert clean_caption(float("nan")) == "" and clean_caption(" a\tb ") == "a b"
    assert resolve_uri("x/y.png", "/data") == "/data/x/y.png" and resolve_uri("gs://b/k", "/data") == "gs://b/k"
    assert listing_format("s3://b/p.JSONL", "auto") == "jsonl" and listing_format("p.txt", "csv") == "csv"
    with pytest.raises(ConfigError, match=r"data\.format"):
        listing_format("s3://b/pairs", "auto")
    assert caption_for("red", "round", "left") == "a red round mass on the left"


# -- config -------------------------------------------------------------------------------------------


def test_the_tiny_yaml_loads_with_overrides_and_bad_keys_are_named():
    cfg = load_finetune_config(
        REPO / "jobs/configs/finetune_tiny.yaml", overrides=["data.listing=s3://b/p.parquet", "optim.lr=1e-4"]
    )
    assert cfg.data.listing == ("s3://b/p.parquet",) and cfg.optim.lr == 1e-4  # "1e-4" is a float here
    assert cfg.loss.kind == "dhn_nce" and (cfg.loss.temperature, cfg.loss.beta1, cfg.loss.beta2) == (0.6, 0.15, 0.15)
    assert cfg.worker_batch_size * cfg.run.num_workers == cfg.optim.batch_size
    assert cfg.hash() == load_finetune_config(REPO / "jobs/configs/finetune_tiny.yaml",
                                              overrides=["data.listing=s3://b/p.parquet", "optim.lr=0.0001",
                                                         "run.storage_path=/elsewhere"]).hash()  # fmt: skip
    for override, message in [
        ("optim.nope=1", "unknown config key optim.nope"),
        ("optim.towers=heads", "optim.towers"),
        ("loss.kind=triplet", "loss.kind"),
        ("optim.batch_size=33", "multiple of run.num_workers"),
        ("data.val_fraction=1.0", "data.val_fraction"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_finetune_config(overrides=[override])
    with pytest.raises(ConfigError, match=r"data\.listing, run\.storage_path, output\.uri"):
        load_finetune_config().check_required()


def test_cli_refuses_an_incomplete_config_with_exit_code_2(capsys):
    from mcs_batch.cli import main

    assert main(["finetune-clip", "--set", "data.listing=/x/pairs.parquet"]) == 2
    assert "run.storage_path, output.uri must be set" in capsys.readouterr().err
    assert main(["finetune-clip", "--config", str(REPO / "jobs/configs/finetune_tiny.yaml"), "--set", "optim.x=1"]) == 2
