"""`explain`: the files a researcher looks at, in the image's own frame, with provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcs_batch.config import load_config
from mcs_batch.explain import explain
from mcs_batch.models.registry import load_models
from mcs_batch.testdata.series import write_series


def make_inputs(folder: Path) -> None:
    img = np.zeros((90, 150), np.uint8)
    img[20:50, 60:110] = 200
    Image.fromarray(img).save(folder / "us.png")
    write_series(folder / "ct", rows=40, cols=48, n_slices=5)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def test_explain_writes_every_file_in_the_image_frame(tmp_path: Path):
    (tmp_path / "in").mkdir()
    make_inputs(tmp_path / "in")
    cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion",
                      overrides=[f"models.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    models = load_models(cfg.models)
    index = explain([str(tmp_path / "in")], tmp_path / "out", cfg, models, slices=[1, 3], progress=lambda m: None)
    by_kind = {}
    for item in index["images"]:
        by_kind.setdefault(item["kind"], []).append(item)
    assert [i["slice_index"] for i in by_kind["dicom_series"]] == [1, 3]
    (png,) = [i for i in by_kind["image"] if i["status"] == "ok"]
    folder = tmp_path / "out" / png["case_id"] / "k0" / "lesion"
    saliency = np.load(folder / "saliency.npy")
    assert saliency.shape == (90, 150) and saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    assert Image.open(folder / "mask.png").size == (150, 90)
    assert Image.open(folder / "coarse_mask.png").size == (150, 90)
    overlay = Image.open(folder / "overlay.png")
    assert overlay.size == (300, 90)  # image | heat map
    boxes = json.loads((folder / "boxes.json").read_text())["boxes_xyxy"]
    assert len(boxes) == png["targets"][0]["boxes"] >= 1
    x0, y0, x1, y1 = boxes[0]
    assert 0 <= x0 < x1 <= 150 and 0 <= y0 < y1 <= 90
    # the broken PNG is reported, not dropped
    (broken,) = [i for i in by_kind["image"] if i["status"] != "ok"]
    assert broken["error_code"] in ("truncated", "decode_error")
    written = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert written["tiny_models"] is True and "meaningless" in written["notice"]
    assert set(written["models"]) == {"clip", "sam"}
    assert all(len(d) == 64 for d in written["models"]["sam"]["sha256"].values())
    assert written["config_hash"] == cfg.hash()


def test_explain_command_line(tmp_path: Path):
    (tmp_path / "in").mkdir()
    make_inputs(tmp_path / "in")
    out = subprocess.run(
        [sys.executable, "-m", "mcs_batch.cli", "explain", str(tmp_path / "in" / "us.png"), "--prompt", "a lesion",
         "--out", str(tmp_path / "out"), "--models", "tiny", "--set", f"models.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "explained 1 image(s) for 1 target(s)" in out.stdout
    assert "TINY random models" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "mcs_batch.cli", "explain", str(tmp_path / "in"), "--prompt", "x",
         "--out", str(tmp_path / "o2"), "--set", "m2ib.layer=oops"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "mcs-batch: error: m2ib.layer: expected an integer, got 'oops'"


def test_the_job_and_explain_see_the_same_maps_and_draw_the_same_masks(tmp_path: Path, ray_local):
    """float32 maps end to end: boxes, saliency statistics and masks of the job equal explain's."""
    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.pipeline import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        img = rng.integers(0, 60, (64 + 16 * i, 80), dtype=np.uint8)
        img[12 + i : 40, 20 : 50 + 4 * i] = 210
        Image.fromarray(img).save(folder / f"img{i}.png")
    common = [f"models.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion", overrides=common)
    index = explain([str(folder)], tmp_path / "explain", cfg, load_models(cfg.models), progress=lambda m: None)
    job_cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion", inputs=[str(folder)],
                          out=str(tmp_path / "job"), overrides=common)  # fmt: skip
    assert job_cfg.hash() == cfg.hash()
    run_job(job_cfg, progress=lambda m: None)
    catalog = Catalog(str(tmp_path / "job"))
    slices = {r["case_id"]: r for r in catalog.slices().to_pylist()}
    cases = {r["case_id"]: r for r in catalog.cases().to_pylist()}
    assert len(index["images"]) == len(slices) == 3
    for item in index["images"]:
        case_id, there = item["case_id"], tmp_path / "explain" / item["case_id"] / "k0" / "lesion"
        saliency = np.load(there / "saliency.npy")
        row = slices[case_id]
        # float32 both ways; what remains is summation order (a batch of 4 in explain, of 1-2 in the job)
        assert row["saliency_mean"] == pytest.approx(float(saliency.mean()), abs=1e-5)
        assert row["saliency_max"] == pytest.approx(float(saliency.max()), abs=1e-5)
        boxes = json.loads((there / "boxes.json").read_text())["boxes_xyxy"]
        job_boxes = np.asarray(row["boxes_xyxy"], float).reshape(-1, 4)
        np.testing.assert_allclose(job_boxes, np.asarray(boxes, float).reshape(-1, 4), atol=1e-3)
        explained = np.asarray(Image.open(there / "mask.png")) > 0
        job_mask = np.asarray(Image.open(cases[case_id]["mask_png_uri"].removeprefix("file://"))) > 0
        np.testing.assert_array_equal(job_mask, explained)
