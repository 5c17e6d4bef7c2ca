"""Pixel decoding on real files shipped in packages: every transfer syntax, colour, LUTs, breakage."""

from __future__ import annotations

import shutil
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut

from mcs_batch.errors import ErrorCode
from mcs_batch.io.load import load_case
from mcs_batch.records import CaseKind, Status
from tests.io.test_geometry import scan_folder

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA = Path(data_store.__file__).parent / "data"


def real(name: str) -> Path:
    for root in (PYDICOM_FILES, PYDICOM_DATA):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(name)


def scan_one(tmp_path: Path, name: str, *, as_name: str | None = None):
    """Copy one real file into a fresh folder and scan it: exactly one case."""
    folder = tmp_path / "in"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(real(name), folder / (as_name or name))
    (record,) = scan_folder(folder)
    return record


def load_one(tmp_path: Path, name: str):
    record = scan_one(tmp_path, name)
    assert record.status == Status.OK, record.error_message
    return record, load_case(record)


MR_SMALL_VARIANTS = [
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("MR_small_padded.dcm", "1.2.840.10008.1.2.1"),
]


@pytest.mark.parametrize("name, syntax", MR_SMALL_VARIANTS)
def test_lossless_syntaxes_decode_to_the_uncompressed_values(tmp_path: Path, name: str, syntax: str):
    _, reference = load_one(tmp_path / "ref", "MR_small.dcm")
    record, volume = load_one(tmp_path, name)
    assert record.transfer_syntax == syntax
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)


@pytest.mark.parametrize(
    "lossless, uncompressed",
    [
        ("693_J2KR.dcm", "693_UNCR.dcm"),  # JPEG 2000 lossless, CT
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),  # JPEG 2000 lossless, MONOCHROME1 CR
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG lossless RGB
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),  # RLE RGB
    ],
)
def test_more_lossless_pairs(tmp_path: Path, lossless: str, uncompressed: str):
    _, a = load_one(tmp_path / "a", lossless)
    _, b = load_one(tmp_path / "b", uncompressed)
    np.testing.assert_array_equal(a.array, b.array)


def test_jpeg_lossless_process_14_matches_pydicom(tmp_path: Path):
    _, volume = load_one(tmp_path, "JPEG-LL.dcm")
    ds = pydicom.dcmread(real("JPEG-LL.dcm"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(volume.slice_image(0), expected.astype(np.float32))


@pytest.mark.parametrize(
    "name, syntax",
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),  # JPEG baseline, YBR_FULL
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),  # JPEG extended 12-bit
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
        ("SC_rgb_jls_lossy_line.dcm", "1.2.840.10008.1.2.4.81"),
        ("MR2_J2KI.dcm", "1.2.840.10008.1.2.4.91"),  # JPEG 2000 (lossy)
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),  # deflated explicit VR little endian
    ],
)
def test_lossy_and_other_syntaxes_decode(tmp_path: Path, name: str, syntax: str):
    record, volume = load_one(tmp_path, name)
    assert record.transfer_syntax == syntax
    ds = pydicom.dcmread(real(name))
    assert volume.shape[:2] == (ds.Columns, ds.Rows)
    assert np.isfinite(volume.array.astype(np.float64)).all() and volume.array.std() > 0


def test_lossy_jpeg_2000_is_close_to_the_original(tmp_path: Path):
    _, lossy = load_one(tmp_path / "a", "MR2_J2KI.dcm")
    _, original = load_one(tmp_path / "b", "MR2_UNCI.dcm")
    rel_error = np.abs(lossy.array - original.array).mean() / original.array.std()
    assert rel_error < 0.05


def test_jpeg_baseline_ybr_becomes_rgb_close_to_the_rgb_original(tmp_path: Path):
    _, jpeg = load_one(tmp_path / "a", "SC_rgb_dcmtk_+eb+cy+np.dcm")  # YBR_FULL_422 baseline
    _, rgb = load_one(tmp_path / "b", "SC_rgb.dcm")
    assert jpeg.is_rgb and jpeg.array.dtype == np.uint8
    assert np.abs(jpeg.array.astype(int) - rgb.array.astype(int)).mean() < 6


def test_uncompressed_ybr_full_is_converted_to_rgb(tmp_path: Path):
    _, ybr = load_one(tmp_path / "a", "SC_ybr_full_uncompressed.dcm")
    _, rgb = load_one(tmp_path / "b", "SC_rgb.dcm")
    diff = np.abs(ybr.array.astype(int) - rgb.array.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 8  # YCbCr round trip rounding only


def test_palette_colour_goes_through_the_lut(tmp_path: Path):
    _, volume = load_one(tmp_path, "examples_palette.dcm")
    ds = pydicom.dcmread(real("examples_palette.dcm"))
    expected = apply_color_lut(ds.pixel_array, ds)
    scale = 255 / 65535 if expected.max() > 255 else 1
    np.testing.assert_array_equal(volume.slice_image(0), np.rint(expected * scale).astype(np.uint8))


def test_monochrome1_is_inverted_in_physical_units(tmp_path: Path):
    _record, volume = load_one(tmp_path, "RG1_UNCI.dcm")
    ds = pydicom.dcmread(real("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    total = volume.slice_image(0) + raw  # inverted + original = a constant (lo + hi of the stored range)
    assert np.ptp(total) == 0
    assert np.corrcoef(volume.slice_image(0).ravel(), raw.ravel())[0, 1] < -0.999


def test_ct_rescale_gives_hounsfield_units(tmp_path: Path):
    _, volume = load_one(tmp_path, "CT_small.dcm")
    ds = pydicom.dcmread(real("CT_small.dcm"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.slice_image(0), expected.astype(np.float32))


def test_multiframe_is_one_case(tmp_path: Path):
    record, volume = load_one(tmp_path, "emri_small.dcm")
    assert record.kind == CaseKind.DICOM_MULTIFRAME
    ds = pydicom.dcmread(real("emri_small.dcm"))
    assert volume.shape == (ds.Columns, ds.Rows, int(ds.NumberOfFrames))
    np.testing.assert_array_equal(volume.slice_image(3), ds.pixel_array[3].astype(np.float32))


def test_multiframe_ybr_jpeg_cine(tmp_path: Path):
    record, volume = load_one(tmp_path, "examples_ybr_color.dcm")
    assert record.kind == CaseKind.DICOM_MULTIFRAME and volume.is_rgb
    assert volume.array.shape == (320, 240, 30, 3)


def test_enhanced_ct_uses_functional_group_geometry(tmp_path: Path):
    record, _volume = load_one(tmp_path, "eCT_Supplemental.dcm")
    ds = pydicom.dcmread(real("eCT_Supplemental.dcm"))
    assert record.kind == CaseKind.DICOM_MULTIFRAME
    frames = ds.PerFrameFunctionalGroupsSequence
    first = np.asarray(frames[0].PlanePositionSequence[0].ImagePositionPatient, float)
    k0 = record.slice_index[0]
    world = np.asarray(record.affine).reshape(4, 4) @ [0, 0, k0, 1]
    np.testing.assert_allclose(world[:3], [-first[0], -first[1], first[2]], atol=1e-3)


def test_file_without_preamble_or_meta(tmp_path: Path):
    ds = pydicom.dcmread(real("MR_small.dcm"))
    expected = ds.pixel_array.astype(np.float32)
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    folder = tmp_path / "in"
    folder.mkdir()
    ds.save_as(folder / "raw_dataset", implicit_vr=False, little_endian=True, enforce_file_format=False)
    assert (folder / "raw_dataset").read_bytes()[128:132] != b"DICM"
    (record,) = scan_folder(folder)
    assert record.status == Status.OK and record.modality == "MR"
    np.testing.assert_array_equal(load_case(record).slice_image(0), expected)


def test_big_endian_without_meta_is_identified(tmp_path: Path):
    record = scan_one(tmp_path, "ExplVR_BigEndNoMeta.dcm")
    assert (record.status, record.error_code) == (Status.SKIPPED, ErrorCode.NON_IMAGE_OBJECT)  # an RT plan


@pytest.mark.parametrize(
    "name, code",
    [
        ("rtplan.dcm", ErrorCode.NON_IMAGE_OBJECT),
        ("rtstruct.dcm", ErrorCode.NON_IMAGE_OBJECT),
        ("rtdose.dcm", ErrorCode.NON_IMAGE_OBJECT),
        ("test-SR.dcm", ErrorCode.NON_IMAGE_OBJECT),
        ("liver_1frame.dcm", ErrorCode.NON_IMAGE_OBJECT),  # DICOM SEG
        ("waveform_ecg.dcm", ErrorCode.NON_IMAGE_OBJECT),
    ],
)
def test_non_image_objects_are_skipped_with_a_reason(tmp_path: Path, name: str, code: ErrorCode):
    record = scan_one(tmp_path, name)
    assert (record.status, record.error_code, record.kind) == (Status.SKIPPED, code, CaseKind.DICOM_OTHER)
    assert name in record.error_message


def test_dicomdir_is_skipped(tmp_path: Path):
    record = scan_one(tmp_path, "dicomdirtests/DICOMDIR", as_name="DICOMDIR")
    assert (record.status, record.error_code) == (Status.SKIPPED, ErrorCode.NON_IMAGE_OBJECT)
    assert "DICOMDIR" in record.error_message


@pytest.mark.parametrize(
    "name, code",
    [
        ("MR_truncated.dcm", ErrorCode.TRUNCATED),  # native pixel data cut short: caught from the header
        ("no_meta.dcm", ErrorCode.NOT_DICOM),  # shifted bytes: not parseable
        ("UN_sequence.dcm", ErrorCode.NO_PIXEL_DATA),
    ],
)
def test_broken_files_fail_at_scan_with_a_code(tmp_path: Path, name: str, code: ErrorCode):
    record = scan_one(tmp_path, name)
    assert (record.status, record.error_code) == (Status.FAILED, code)
    assert name in record.error_message


def test_truncated_compressed_file_fails_at_load_with_a_code(tmp_path: Path):
    record = scan_one(tmp_path, "emri_small_jpeg_2k_lossless_too_short.dcm")
    assert record.status == Status.OK  # the header is intact; the damage is in the compressed stream
    with pytest.raises(Exception) as info:
        load_case(record)
    assert getattr(info.value, "code", None) in (ErrorCode.TRUNCATED, ErrorCode.DECODE_ERROR)


def test_corrupted_compressed_stream_is_a_decode_error(tmp_path: Path):
    data = bytearray(real("MR_small_jp2klossless.dcm").read_bytes())
    middle = len(data) - 1500
    data[middle : middle + 400] = bytes(400)  # zero out part of the codestream
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.dcm").write_bytes(bytes(data))
    (record,) = scan_folder(folder)
    try:
        volume = load_case(record)
    except Exception as e:  # either refused with a code ...
        assert getattr(e, "code", None) in (ErrorCode.DECODE_ERROR, ErrorCode.TRUNCATED)
    else:  # ... or decoded into visibly different pixels; never a crash
        _, good = load_one(tmp_path / "good", "MR_small_jp2klossless.dcm")
        assert not np.array_equal(volume.array, good.array)


def test_random_bytes_named_dcm_fail_and_other_files_skip(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.dcm").write_bytes(b"")
    records = {r.source_keys[0].split("/", 1)[1]: r for r in scan_folder(folder)}  # keys: <input name>/<path>
    assert (records["noise.dcm"].status, records["noise.dcm"].error_code) == (Status.FAILED, ErrorCode.NOT_DICOM)
    assert (records["notes.txt"].status, records["notes.txt"].error_code) == (Status.SKIPPED, ErrorCode.NOT_DICOM)
    assert (records["empty.dcm"].status, records["empty.dcm"].error_code) == (Status.FAILED, ErrorCode.EMPTY_OBJECT)


def _nifti(path: Path, affine: np.ndarray, *, nan_voxel: bool = False) -> Path:
    import struct

    import nibabel as nib

    nib.save(nib.Nifti1Image(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), affine), str(path))
    if nan_voxel:  # the qform alone, with a NaN voxel size (header bytes: qform_code 252, sform_code 254)
        data = bytearray(path.read_bytes())
        data[252:256] = struct.pack("<hh", 1, 0)
        data[80:84] = struct.pack("<f", float("nan"))  # pixdim[1]
        path.write_bytes(bytes(data))
    return path


def test_a_nifti_with_nan_geometry_fails_as_bad_geometry_before_any_model(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    nan_sform = np.eye(4)
    nan_sform[0, 3] = np.nan
    _nifti(folder / "nan_sform.nii.gz", nan_sform)
    _nifti(folder / "nan_voxel.nii", np.eye(4), nan_voxel=True)
    _nifti(folder / "good.nii.gz", np.diag([0.5, 0.5, 2.0, 1.0]))
    records = {r.source_keys[0].split("/", 1)[1]: r for r in scan_folder(folder)}  # keys: <input name>/<path>
    for name in ("nan_sform.nii.gz", "nan_voxel.nii"):
        assert (records[name].status, records[name].error_code) == (Status.FAILED, ErrorCode.BAD_GEOMETRY), name
        assert name in records[name].error_message
    assert records["good.nii.gz"].status == Status.OK and records["good.nii.gz"].spacing_mm == [0.5, 0.5, 2.0]


def test_a_zero_byte_read_blames_storage_not_the_file(tmp_path: Path):
    import fsspec

    from mcs_batch.io.discover import ObjectRef, probe_object

    (tmp_path / "gone.dcm").write_bytes(b"")  # emptied after the listing saw 4,000 bytes
    probe = probe_object(ObjectRef(str(tmp_path / "gone.dcm"), "gone.dcm", 4000), fs=fsspec.filesystem("file"))
    assert (probe.record.status, probe.record.error_code) == (Status.FAILED, ErrorCode.UNREADABLE)
    assert "storage returned 0 of 4000 bytes" in probe.record.error_message
