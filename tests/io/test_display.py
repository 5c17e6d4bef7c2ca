"""The display orientation: a NIfTI volume reaches the models as its DICOM twin does, whatever its
stored axes, and what is built in the display grid goes back to the stored grid exactly."""

from __future__ import annotations

import dataclasses
import posixpath
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from mcs_batch.config import JobConfig
from mcs_batch.io.display import display_shape, slice_count, to_display, to_stored, volume_in_display
from mcs_batch.io.load import load_case
from mcs_batch.records import CaseRecord
from mcs_batch.stages.load import load_chunk
from mcs_batch.testdata.series import write_series
from tests.io.test_geometry import scan_folder

# Stored layouts of one volume: as the DICOM series (L, P, S), RAS, slices reversed, axes permuted.
LAYOUTS = {"lps": ("L", "P", "S"), "ras": ("R", "A", "S"), "lpi": ("L", "P", "I"), "perm": ("S", "R", "P")}


def reoriented(image: nib.Nifti1Image, axcodes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same voxels in world space, stored along other axes (array and affine adjusted)."""
    return image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(axcodes)))


def write_twins(folder: Path, *, modality: str = "MR") -> dict[str, CaseRecord]:
    """A synthetic DICOM series and NIfTI files of its volume in every layout of LAYOUTS: records by name."""
    write_series(folder / "dicom", rows=20, cols=28, n_slices=5, modality=modality, series_seed="twin")
    (series,) = scan_folder(folder / "dicom")
    volume = load_case(series)
    lps = nib.Nifti1Image(volume.array, volume.affine)
    for name, axcodes in LAYOUTS.items():
        twin = reoriented(lps, axcodes)
        assert nib.aff2axcodes(twin.affine) == axcodes
        nib.save(twin, folder / f"{name}.nii.gz")
    records = {posixpath.basename(r.source_keys[0]).removesuffix(".nii.gz"): r
               for r in scan_folder(folder) if r.kind == "nifti"}  # fmt: skip
    return {"dicom": series, **records}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_every_stored_layout_gives_the_models_the_dicom_twins_slices(tmp_path: Path, axis: int):
    records = write_twins(tmp_path)
    cfg = JobConfig(slice_axis=axis)
    dicom = records.pop("dicom")
    assert display_shape(dicom) == (28, 20, 5) and slice_count(dicom, axis) == (28, 20, 5)[axis]
    expected = load_chunk(dicom, 0, slice_count(dicom, axis), cfg, fs=None)
    for name, record in records.items():
        assert display_shape(record) == (28, 20, 5), name
        got = load_chunk(record, 0, slice_count(record, axis), cfg, fs=None, cache={})
        assert len(got) == len(expected)
        for k, (a, b) in enumerate(zip(got, expected, strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} slice {k} along axis {axis}")


def test_display_and_stored_grids_map_the_same_voxels_to_the_same_world(tmp_path: Path):
    records = write_twins(tmp_path)
    reference = volume_in_display(load_case(records["lps"]), records["lps"])
    for name in LAYOUTS:
        record = records[name]
        stored = load_case(record)
        shown = volume_in_display(stored, record)
        np.testing.assert_array_equal(shown.array, reference.array, err_msg=name)
        np.testing.assert_allclose(shown.affine, reference.affine, atol=1e-5, err_msg=name)
        assert nib.aff2axcodes(shown.affine) == ("L", "P", "S")
        np.testing.assert_array_equal(to_display(stored.array, record), shown.array)
        back = to_stored(to_display(stored.array, record), record)
        assert back.shape == tuple(record.shape) and np.array_equal(back, stored.array)


def test_a_sagittal_dicom_series_is_shown_as_its_nifti_twin_and_2d_images_as_stored(tmp_path: Path):
    write_series(tmp_path / "sagittal", rows=12, cols=10, n_slices=3, orientation=(0, 1, 0, 0, 0, -1), modality="MR")
    (sagittal,) = scan_folder(tmp_path / "sagittal")  # stored i -> P, j -> I, k -> R
    array = np.arange(10 * 12 * 3).reshape(10, 12, 3)
    assert display_shape(sagittal) == (3, 10, 12) and np.array_equal(to_stored(to_display(array, sagittal),
                                                                              sagittal), array)  # fmt: skip
    stored = load_case(sagittal)
    nib.save(nib.Nifti1Image(stored.array, stored.affine), tmp_path / "twin.nii.gz")
    (twin,) = [r for r in scan_folder(tmp_path) if r.kind == "nifti"]
    cfg = JobConfig()
    for axis in (0, 1, 2):  # axial (2) now: the series' files lie along the display's i axis
        n = slice_count(sagittal, axis)
        dicom = load_chunk(sagittal, 0, n, dataclasses.replace(cfg, slice_axis=axis), fs=None, cache={})
        nifti = load_chunk(twin, 0, n, dataclasses.replace(cfg, slice_axis=axis), fs=None, cache={})
        assert len(dicom) == n == (3, 10, 12)[axis]
        for a, b in zip(dicom, nifti, strict=True):
            np.testing.assert_array_equal(a, b)
    flat = nib.Nifti1Image(np.zeros((6, 4, 1), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))  # RAS, one slice
    nib.save(flat, tmp_path / "flat.nii")
    (record,) = [r for r in scan_folder(tmp_path) if r.kind == "nifti" and r.source_keys[0].endswith("flat.nii")]
    assert display_shape(record) == (6, 4, 1) and slice_count(record, 0) == 1
