"""Listings read with Ray Data (Parquet / CSV / JSONL, local and S3), images decoded as the job does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mcs_batch.config import JobConfig
from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.models.biomedclip import resize_for_clip
from mcs_batch.scan import discover_cases
from mcs_batch.stages.load import load_chunk
from mcs_batch.testdata.pairs import write_shape_pairs
from mcs_batch.testdata.series import write_series
from mcs_batch.train.config import PairsConfig
from mcs_batch.train.pairs import TRAIN, VAL, decoded, listing_digest, read_pairs, split_counts, split_of


def _rows(ds) -> list[dict]:
    return sorted(ds.take_all(), key=lambda r: (r["image_uri"], r["caption"]))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_every_listing_format_gives_the_same_pairs(ray_local, tmp_path: Path, fmt: str):
    listing = write_shape_pairs(tmp_path, n=20, seed=1, fmt=fmt)
    cfg = PairsConfig(listing=(str(listing),), val_fraction=0.3)
    pairs = read_pairs(cfg)
    rows = _rows(pairs)
    assert len(rows) == 20
    assert rows[0]["image_uri"] == str(tmp_path / "images" / "00000.png")  # relative to the listing
    assert rows[0]["caption"] == "a red round mass on the left"
    counts = split_counts(pairs)
    # the split is a pure function of (salt, uri): what split_of says for each row, in every format
    expected = [split_of(r["image_uri"], val_fraction=0.3, salt=cfg.split_salt) for r in rows]
    assert [r["split"] for r in rows] == expected
    assert counts[TRAIN] == expected.count(TRAIN) and counts[VAL] == expected.count(VAL)


def test_decoding_png_and_dicom_matches_the_segmentation_job(ray_local, tmp_path: Path):
    (tmp_path / "dicom").mkdir()
    series = write_series(tmp_path / "dicom", rows=40, cols=48, n_slices=1, modality="CT")
    rng = np.random.default_rng(0)
    from PIL import Image

    from mcs_batch.testdata.pairs import shape_image

    Image.fromarray(shape_image("blue", "square", "left", size=70, rng=rng)[:, :50]).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows = [
        {"image": "a.png", "caption": "a blue square mass on the left"},
        {"image": str(series[0]), "caption": "a bright body disc on a ct slice"},
        {"image": "broken.png", "caption": "this image cannot be decoded"},
        {"image": "a.png", "caption": "short"},  # dropped: fewer than 8 characters
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PairsConfig(listing=(str(tmp_path / "pairs.jsonl"),), val_fraction=0.0, resize="pad")
    pairs = read_pairs(cfg)
    assert split_counts(pairs) == {"train": 3, "val": 0, "dropped_no_image": 0, "dropped_short_caption": 1}
    out = {r["caption"]: r for r in decoded(pairs, TRAIN, cfg, image_size=224, storage=None, num_cpus=0.25).take_all()}
    assert set(out) == {rows[0]["caption"], rows[1]["caption"]}  # the broken PNG is dropped, not fatal
    for row in rows[:2]:
        # the job's path: discover -> load_chunk (decode, slice, window) -> CLIP placement
        (record,) = discover_cases([str(tmp_path / row["image"])])
        (image,) = load_chunk(record, 0, 1, JobConfig(), fs=None)
        expected, _ = resize_for_clip(image, "pad", size=224)
        got = out[row["caption"]]["pixels"]
        assert got.dtype == np.uint8 and got.shape == (224, 224, 3)
        np.testing.assert_array_equal(got, expected.astype(np.uint8))


def test_listing_on_s3_with_images_on_s3(ray_local, tmp_path: Path, s3_server, s3_bucket):
    bucket, fs = s3_bucket
    listing = write_shape_pairs(tmp_path, n=6, seed=2, fmt="parquet")
    fs.put(str(tmp_path / "images"), f"{bucket}/set/images", recursive=True)
    fs.put_file(str(listing), f"{bucket}/set/pairs.parquet")
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    cfg = PairsConfig(listing=(f"s3://{bucket}/set/pairs.parquet",), val_fraction=0.0)
    pairs = read_pairs(cfg, storage=storage)
    assert {r["image_uri"] for r in pairs.take_all()} == {f"s3://{bucket}/set/images/{i:05d}.png" for i in range(6)}
    images = decoded(pairs, TRAIN, cfg, image_size=224, storage=storage, num_cpus=0.25).take_all()
    assert len(images) == 6 and all(r["pixels"].shape == (224, 224, 3) for r in images)
    digest = listing_digest(cfg, storage=storage)
    local = listing_digest(PairsConfig(listing=(str(listing),)))
    assert list(digest["files"].values()) == list(local["files"].values())  # the same bytes


def test_listing_errors_name_the_problem(ray_local, tmp_path: Path):
    listing = write_shape_pairs(tmp_path, n=4, seed=3, fmt="csv")
    with pytest.raises(ConfigError, match="no column 'text'"):
        read_pairs(PairsConfig(listing=(str(listing),), caption_column="text"))
    with pytest.raises(ConfigError, match="no such listing"):
        read_pairs(PairsConfig(listing=(str(tmp_path / "missing.parquet"),)))
    with pytest.raises(ConfigError, match=r"data\.format"):
        read_pairs(PairsConfig(listing=(str(tmp_path),)))
