"""PNG/JPEG cases and the modality-aware conversion to model input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError, ConfigError, ErrorCode
from mcs_batch.io.load import load_case
from mcs_batch.io.window import WindowSettings, percentile_window, to_model_rgb, window_level
from mcs_batch.records import CaseKind, Status
from mcs_batch.stages.load import load_chunk
from mcs_batch.testdata.series import write_series
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
    assert volume.array[40, 5, 0] == 200 and volume.meta["as_stored"]  # (i = column, j = row)
    np.testing.assert_array_equal(volume.slice_image(0), gray.astype(np.float32))  # display frame = the PNG
    c = load_case(records["c.jpg"])
    assert c.is_rgb and c.array.shape == (50, 30, 1, 3)
    assert np.abs(c.slice_image(0)[7, 3].astype(int) - [10, 20, 30]).max() < 12


def model_input(folder: Path) -> dict[str, np.ndarray]:
    """Source key in the folder -> the first slice as the job's reader gives it to the models."""
    records = scan_folder(folder)  # keys start with the folder's own name
    return {r.source_keys[0].split("/", 1)[1]: load_chunk(r, 0, 1, JobConfig(), fs=None)[0] for r in records}


def test_8bit_greyscale_reaches_the_models_as_stored_and_16bit_is_windowed(tmp_path: Path):
    gray = np.random.default_rng(1).integers(60, 181, (30, 50), dtype=np.uint8)  # a stretch would widen it
    stored = np.repeat(gray[:, :, None], 3, axis=2)
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(stored).save(tmp_path / "rgb.png")  # the RGB twin: R = G = B
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(gray).save(tmp_path / "l.jpg", quality=95)
    Image.fromarray(gray > 120).save(tmp_path / "bilevel.png")  # mode 1
    Image.fromarray(gray.astype(np.uint16) * 200).save(tmp_path / "sixteen.png")  # mode I;16
    got = model_input(tmp_path)
    for key in ("l.png", "rgb.png", "la.png"):
        assert got[key].dtype == np.uint8 and got[key].shape == (30, 50, 3)
        np.testing.assert_array_equal(got[key], stored, err_msg=key)
    jpeg = np.asarray(Image.open(tmp_path / "l.jpg"))  # what PIL decodes, unchanged
    np.testing.assert_array_equal(got["l.jpg"], np.repeat(jpeg[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(got["bilevel.png"][:, :, 0], np.where(gray > 120, 255, 0))
    sixteen = got["sixteen.png"][:, :, 0]
    np.testing.assert_array_equal(sixteen, percentile_window(gray.astype(np.float32) * 200, 0.5, 99.5).round())
    assert sixteen.min() == 0 and sixteen.max() == 255  # windowed: the 0.5-99.5 percentiles stretched


def eight_bit_dicom(folder: Path, pixels: np.ndarray, *, modality: str, slope: str = "1") -> None:
    """One synthetic slice rewritten as 8-bit unsigned MONOCHROME2."""
    (path,) = write_series(folder, rows=pixels.shape[0], cols=pixels.shape[1], n_slices=1, modality=modality,
                           series_seed=f"{folder.name}")  # fmt: skip
    ds = pydicom.dcmread(path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.PixelData = slope, pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_8bit_dicom_and_nifti_without_units_reach_the_models_as_stored(tmp_path: Path):
    gray = np.random.default_rng(2).integers(60, 181, (24, 32), dtype=np.uint8)
    stored = np.repeat(gray[:, :, None], 3, axis=2)
    eight_bit_dicom(tmp_path / "mr", gray, modality="MR")
    eight_bit_dicom(tmp_path / "ct", gray, modality="CT")  # HU: windowed
    eight_bit_dicom(tmp_path / "scaled", gray, modality="MR", slope="2")  # rescaled: windowed
    volume = np.repeat(gray.T[:, :, None], 3, axis=2)  # [I, J, K], three equal slices
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "u8.nii.gz")
    scaled = nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0]))
    scaled.header.set_slope_inter(2.0, 0.0)
    nib.save(scaled, tmp_path / "u8_scaled.nii.gz")
    got = {key.split("/")[0]: image for key, image in model_input(tmp_path).items()}
    np.testing.assert_array_equal(got["mr"], stored)
    np.testing.assert_array_equal(got["u8.nii.gz"], stored)
    ct = to_model_rgb(gray.astype(np.float32), modality="CT")
    np.testing.assert_array_equal(got["ct"], ct)
    assert not np.array_equal(ct, stored)
    for key in ("scaled", "u8_scaled.nii.gz"):
        np.testing.assert_array_equal(got[key], to_model_rgb(gray * np.float32(2), modality="MR"), err_msg=key)
        assert not np.array_equal(got[key], stored)


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
