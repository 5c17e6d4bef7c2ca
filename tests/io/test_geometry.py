"""Geometry against an independent reader: SimpleITK for DICOM series, nibabel for NIfTI.

World coordinates of the volume corners (RAS mm) must agree within 1e-3 mm.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from mcs_batch.errors import ErrorCode
from mcs_batch.io.load import load_case
from mcs_batch.io.volume import LPS_TO_RAS, corners_world
from mcs_batch.records import CaseKind, CaseRecord, Status
from mcs_batch.scan import discover_cases
from mcs_batch.testdata.series import oblique_orientation, write_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def scan_folder(folder: Path) -> list[CaseRecord]:
    """Probe + assemble without Ray (the Ray path is tested in test_scan)."""
    return discover_cases([str(folder)])


def sitk_corners(paths: list[str]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Corners (RAS) of the volume SimpleITK's series reader builds from these files."""
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(Path(paths[0]).parent))
    names = [n for n in names if n in set(paths)]
    reader.SetFileNames(names)
    image = reader.Execute()
    size = image.GetSize()
    pts = []
    for i in (0, size[0] - 1):
        for j in (0, size[1] - 1):
            for k in (0, size[2] - 1):
                lps = image.TransformIndexToPhysicalPoint((i, j, k))
                pts.append((LPS_TO_RAS[:3, :3] @ np.asarray(lps)).tolist())
    return np.asarray(pts), size


def record_affine(record: CaseRecord) -> np.ndarray:
    return np.asarray(record.affine).reshape(4, 4)


def only_ok(records: list[CaseRecord], kind: str = CaseKind.DICOM_SERIES) -> list[CaseRecord]:
    return [r for r in records if r.status == Status.OK and r.kind == kind]


def test_real_multifile_series_matches_simpleitk():
    folder = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
    (record,) = only_ok(scan_folder(folder))
    assert record.n_files == 5 and record.shape == [16, 16, 5]
    ours = corners_world(tuple(record.shape), record_affine(record))
    theirs, size = sitk_corners([u.removeprefix("file://") for u in record.source_uris])
    assert size == tuple(record.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    # slices were sorted along the normal: z increases with k although files are named otherwise
    volume = load_case(record)
    assert volume.shape == (16, 16, 5)
    for k, uri in enumerate(record.source_uris):
        ds = pydicom.dcmread(uri.removeprefix("file://"))
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.slice_image(k), expected)
        ipp_ras = LPS_TO_RAS[:3, :3] @ np.asarray(ds.ImagePositionPatient, float)
        np.testing.assert_allclose(volume.affine[:3, :3] @ [0, 0, k] + volume.affine[:3, 3], ipp_ras, atol=1e-3)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("shuffled", {"shuffle_seed": 3}),
        ("oblique", {"orientation": oblique_orientation(30.0, 20.0)}),
        ("non_unit_spacing", {"pixel_spacing": (0.37, 1.9), "slice_spacing": 3.3}),
        ("sagittal", {"orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)}),
    ],
)
def test_synthetic_series_match_simpleitk(tmp_path: Path, name: str, kwargs: dict):
    paths = write_series(tmp_path / name, series_seed=name, **kwargs)
    (record,) = only_ok(scan_folder(tmp_path / name))
    assert record.shape == [24, 32, 6]
    ours = corners_world(tuple(record.shape), record_affine(record))
    theirs, size = sitk_corners([str(p) for p in paths])
    assert size == (24, 32, 6)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    spacing = kwargs.get("pixel_spacing", (0.7, 0.8))
    np.testing.assert_allclose(record.spacing_mm, [spacing[1], spacing[0], kwargs.get("slice_spacing", 2.5)], atol=1e-6)


def test_missing_slice_keeps_exact_geometry(tmp_path: Path):
    origin = np.array([-10.0, -20.0, 30.0])
    write_series(tmp_path, n_slices=8, drop=[3], origin=origin, slice_spacing=2.0)
    (record,) = only_ok(scan_folder(tmp_path))
    assert record.n_files == 7 and record.shape[2] == 8
    assert record.slice_index == [0, 1, 2, 4, 5, 6, 7, 8][:7] or record.slice_index == [0, 1, 2, 4, 5, 6, 7]
    assert any("gap" in w for w in record.warnings)
    affine = record_affine(record)
    for k in range(8):  # every real slice sits where its file says
        expected_lps = origin + np.array([0.0, 0.0, 2.0 * k])
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [*(LPS_TO_RAS[:3, :3] @ expected_lps), 1], atol=1e-3)
    volume = load_case(record)
    assert volume.meta["filled_slices"] == 1
    assert volume.array[:, :, 3].max() == volume.array.min()  # the filled slice holds no invented structure


def test_a_duplicate_position_nothing_separates_gives_one_2d_case_per_image(tmp_path: Path):
    paths = write_series(tmp_path, duplicate=[2])
    records = scan_folder(tmp_path)
    assert not [r for r in records if r.kind == CaseKind.DICOM_SERIES]  # no volume to build ...
    assert sorted(u.removeprefix("file://") for r in records for u in r.source_uris) == sorted(map(str, paths))
    for record in records:  # ... and no decodable image lost: 7 cases of K = 1, each saying why
        assert (record.kind, record.status, record.shape) == (CaseKind.DICOM_IMAGE, Status.OK, [24, 32, 1])
        assert record.warnings[0].startswith("fallback_2d: ") and "duplicate slice position" in record.warnings[0]
    assert len({r.case_id for r in records}) == 7
    image = load_case(records[0])
    assert image.array.shape == (24, 32, 1)


def test_a_sparse_series_gives_2d_cases_where_each_image_stays_in_place(tmp_path: Path):
    origin = np.array([-10.0, -20.0, 30.0])
    heights = [0.0, 2.5, 5.0, 11.0, 12.5]  # unevenly spread: no regular volume
    write_series(tmp_path, positions=[origin + np.array([0.0, 0.0, z]) for z in heights])
    records = scan_folder(tmp_path)
    assert len(records) == 5 and {(r.kind, r.status) for r in records} == {(CaseKind.DICOM_IMAGE, Status.OK)}
    assert all("irregular slice spacing" in r.warnings[0] for r in records)
    placed = sorted(float((record_affine(r) @ [0, 0, 0, 1])[2]) for r in records)  # RAS z = LPS z
    np.testing.assert_allclose(placed, origin[2] + np.array(heights), atol=1e-4)


def test_two_series_in_one_folder(tmp_path: Path):
    a = write_series(tmp_path, series_seed="a", prefix="a", n_slices=4)
    b = write_series(tmp_path, series_seed="b", prefix="b", n_slices=5, orientation=oblique_orientation(10, 0))
    records = only_ok(scan_folder(tmp_path))
    assert sorted(r.n_files for r in records) == [4, 5]
    for record in records:
        paths = [u.removeprefix("file://") for u in record.source_uris]
        assert set(paths) <= {str(p) for p in a} or set(paths) <= {str(p) for p in b}
        ours = corners_world(tuple(record.shape), record_affine(record))
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sorted(paths, key=lambda p: pydicom.dcmread(p).ImagePositionPatient[2]))
        # GDCM's own sort (by position along the normal), restricted to this series:
        names = [n for n in reader.GetGDCMSeriesFileNames(str(tmp_path), record.series_uid)]
        reader.SetFileNames(names)
        image = reader.Execute()
        size = image.GetSize()
        theirs = [
            LPS_TO_RAS[:3, :3] @ np.asarray(image.TransformIndexToPhysicalPoint((i, j, k)))
            for i in (0, size[0] - 1)
            for j in (0, size[1] - 1)
            for k in (0, size[2] - 1)
        ]
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-3)


def test_case_ids_are_deterministic_and_location_independent(tmp_path: Path):
    write_series(tmp_path / "x" / "one", series_seed="same")
    write_series(tmp_path / "y", series_seed="same")
    (r1,) = only_ok(scan_folder(tmp_path / "x"))
    (r2,) = only_ok(scan_folder(tmp_path / "y"))
    assert r1.case_id == r2.case_id  # the same series, wherever it lives


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "standard.nii.gz", "example_nifti2.nii.gz"])
def test_nifti_geometry_matches_nibabel(tmp_path: Path, name: str):
    src = NIBABEL_DATA / name
    (tmp_path / name).write_bytes(src.read_bytes())
    (record,) = scan_folder(tmp_path)
    assert record.status == Status.OK and record.kind == CaseKind.NIFTI
    img = nib.load(src)
    np.testing.assert_allclose(record_affine(record), img.affine, atol=1e-6)
    assert tuple(record.shape) == tuple(img.shape[:3])
    volume = load_case(record)
    expected = np.asarray(img.dataobj[..., 0] if img.ndim == 4 else img.dataobj, dtype=np.float32)
    np.testing.assert_array_equal(volume.array, expected.reshape(volume.array.shape))
    if img.ndim == 4:
        assert any("first volume" in w for w in record.warnings)
    np.testing.assert_allclose(
        corners_world(volume.shape, volume.affine), corners_world(img.shape[:3], img.affine), atol=1e-3
    )


def test_chunked_load_keeps_world_coordinates(tmp_path: Path):
    write_series(tmp_path, n_slices=10)
    (record,) = only_ok(scan_folder(tmp_path))
    full = load_case(record)
    chunk = load_case(record, slices=slice(4, 7))
    assert chunk.shape == (24, 32, 3)
    np.testing.assert_array_equal(chunk.array, full.array[:, :, 4:7])
    np.testing.assert_allclose(chunk.affine @ [1, 2, 0, 1], full.affine @ [1, 2, 4, 1], atol=1e-9)


def test_projection_images_are_2d_cases_not_slices():
    folder = PYDICOM_FILES / "dicomdirtests" / "98892003" / "MR700"
    records = scan_folder(folder)
    assert len(records) == 7
    assert {r.kind for r in records} == {CaseKind.DICOM_IMAGE}
    assert all(r.status == Status.OK and r.shape == [16, 16, 1] for r in records)


def test_localizers_are_split_off_and_skipped():
    records = scan_folder(PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT2N")
    assert {(r.status, r.error_code) for r in records} == {(Status.SKIPPED, ErrorCode.LOCALIZER)}
    assert os.path.basename(records[0].source_uris[0]) in {"6293", "6924"}
