"""PNG/JPEG cases and the modality-aware conversion to model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcs_batch.errors import CaseError, ConfigError, ErrorCode
from mcs_batch.io.load import load_case
from mcs_batch.io.window import WindowSettings, percentile_window, to_model_rgb, window_level
from mcs_batch.records import CaseKind, Status
from tests.io.test_geometry import scan_folder


def test_png_gray_and_rgb_keep_orientation(tmp_path: Path):
    gray = np.zeros((30, 50), np.uint8)  # H=30, W=50
    gray[5, 40] = 200  # row 5, column 40
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = np.zeros((30, 50, 3), np.uint8)
    rgb[7, 3] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    records = {r.source_keys[0].split("/", 1)[1]: r for r in scan_folder(tmp_path)}  # keys: <input name>/<path>
    g = records["g.png"]
    assert (g.kind, g.status, g.shape) == (CaseKind.IMAGE, Status.OK, [50, 30, 1])
    volume = load_case(g)
    assert volume.array[40, 5, 0] == 200  # (i = column, j = row)
    np.testing.assert_array_equal(volume.slice_image(0), gray.astype(np.float32))  # display frame = the PNG
    c = load_case(records["c.jpg"])
    assert c.is_rgb and c.array.shape == (50, 30, 1, 3)
    assert np.abs(c.slice_image(0)[7, 3].astype(int) - [10, 20, 30]).max() < 12


def test_truncated_png_fails_at_load_with_a_code(tmp_path: Path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    (record,) = scan_folder(tmp_path)
    with pytest.raises(CaseError) as info:
        load_case(record)
    assert info.value.code in (ErrorCode.TRUNCATED, ErrorCode.DECODE_ERROR)
    assert "a.png" in info.value.message


def test_ct_windows():
    hu = np.array([[-1000.0, -600.0, 150.0, 2000.0]])
    lung = window_level(hu, -600, 1500)
    np.testing.assert_allclose(lung[0, 1], 127.5)
    assert lung[0, 0] == pytest.approx(255 * (-1000 + 1350) / 1500)
    assert lung[0, 3] == 255.0
    rgb = to_model_rgb(hu, modality="CT", settings=WindowSettings(ct_window="brain"))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 0, 255, 255]  # brain window 40 +- 40 HU
    explicit = to_model_rgb(hu, modality="CT", settings=WindowSettings(ct_level_width=(150.0, 2.0)))
    assert explicit[0, :, 0].tolist() == [0, 0, 128, 255]


def test_percentile_window_and_constant_images():
    values = np.arange(1000, dtype=np.float32).reshape(10, 100)
    out = percentile_window(values, 1.0, 99.0)
    assert out.min() == 0 and out.max() == 255
    assert (out == 0).sum() == 10 and (out == 255).sum() == 10  # 1% clipped at each end
    assert not percentile_window(np.full((4, 4), 7.0), 0.5, 99.5).any()
    rgb = to_model_rgb(values, modality="MR")
    assert rgb.shape == (10, 100, 3) and (rgb[..., 0] == rgb[..., 2]).all()


def test_bad_window_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown CT window 'soft'"):
        WindowSettings(ct_window="soft")
    with pytest.raises(ConfigError, match="percentiles"):
        WindowSettings(percentiles=(90, 10))
