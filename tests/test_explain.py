"""`explain`: the files a researcher looks at, in the image's own frame, with provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
