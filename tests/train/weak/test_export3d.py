"""3d_fullres export: whole volumes in physical units (HU for CT) with their geometry, the pseudo-label
in the same grid, slices failing the filters as nnU-Net's ignore label. Plain function calls, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mcs_batch.io.load import load_case
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.reader import record_of
from mcs_batch.train.weak.config import Configuration, load_weak_config
from mcs_batch.train.weak.export3d import (
    IGNORE,
    WHOLE_VOLUME,
    channel_name,
    dataset_json_3d,
    export_volume_cases,
    resolve_configuration,
)
from mcs_batch.train.weak.select import select_from_catalog
from tests.train.weak.cases import add_nifti_case, add_series_case


def _export(tmp_path: Path, overrides=()):
    out = tmp_path / "out"
    catalog = Catalog(str(out))
    series = add_series_case(catalog, tmp_path / "ct")
    nifti, _ = add_nifti_case(catalog, tmp_path / "nifti")
    cfg = load_weak_config(source=str(out), target="lesion", work=str(tmp_path / "w"), overrides=list(overrides))
    selection = select_from_catalog(catalog, "lesion", cfg.select)
    slices = {}
    for row in catalog.slices().to_pylist():
        slices.setdefault(row["case_id"], []).append(row)
    raw = tmp_path / "raw"
    result = export_volume_cases(selection.cases, slices, cfg=cfg, raw=str(raw), storage=None)
    return result, raw, series, nifti


def test_volumes_are_exported_in_physical_units_with_their_geometry(tmp_path: Path):
    result, raw, series, nifti = _export(tmp_path)
    assert sorted(r["case_id"] for r in result["rows"]) == sorted([series["case_id"], nifti["case_id"]])
    assert all(r["slice_index"] == WHOLE_VOLUME for r in result["rows"]) and result["ignored"] == 0
    assert sorted(result["modalities"]) == ["", "CT"]

    # the DICOM series (stored L, P, S: the display orientation): HU values and the record's affine
    image = nib.load(raw / "imagesTr" / f"{series['case_id']}_0000.nii.gz")
    label = nib.load(raw / "labelsTr" / f"{series['case_id']}.nii.gz")
    source = load_case(record_of(series))
    affine = np.reshape(series["affine"], (4, 4))
    assert image.shape == label.shape == (20, 24, 4) and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    np.testing.assert_allclose(label.affine, affine, atol=1e-5)
    hu = np.asarray(image.dataobj)
    np.testing.assert_array_equal(hu, source.array)  # the values io/ loads: HU, not a windowed 0..255
    assert hu.min() == -1000 and hu.max() >= 300  # air and the phantom's bright blob, in HU
    np.testing.assert_allclose(image.header.get_zooms(), series["spacing_mm"], atol=1e-5)
    labels = np.asarray(label.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
    assert labels[5:12, 6:15, 1:3].all() and labels.sum() == 7 * 9 * 2  # the mask, same grid

    # the NIfTI stored R, A, S: reoriented to L, P, S, the same voxels at the same world positions
    image = nib.load(raw / "imagesTr" / f"{nifti['case_id']}_0000.nii.gz")
    label = nib.load(raw / "labelsTr" / f"{nifti['case_id']}.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S") and np.allclose(image.affine, label.affine)
    source = load_case(record_of(nifti))
    canonical = nib.as_closest_canonical(image)  # back to R, A, S: exactly the source file
    np.testing.assert_allclose(canonical.affine, np.reshape(nifti["affine"], (4, 4)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), source.array)
    world_label = np.asarray(nib.as_closest_canonical(label).dataobj)
    assert world_label[2:8, 3:14, 1:3].all() and world_label.sum() == 6 * 11 * 2
    assert (source.array[world_label == 1] == 500.0).all()  # label and image in the same grid


def test_slices_failing_the_filters_become_the_ignore_label(tmp_path: Path):
    result, _, series, _ = _export(tmp_path, overrides=["select.min_sam_score=0.95"])  # every score is 0.9
    # no slice of a case keeps a label: both cases are left out, every masked slice counted
    assert result["rows"] == [] and result["dropped"] == {"low_sam_score": 4, "no_labelled_slice": 2}

    out = tmp_path / "out"
    catalog = Catalog(str(out))
    slices = [r for r in catalog.slices().to_pylist() if r["case_id"] == series["case_id"]]
    for s in slices:
        s["sam_score"] = 0.2 if s["slice_index"] == 2 else 0.9
    cfg = load_weak_config(source=str(out), target="lesion", work=str(tmp_path / "w"),
                           overrides=["select.min_sam_score=0.5"])  # fmt: skip
    (case,) = [c for c in select_from_catalog(catalog, "lesion", cfg.select).cases if c["case_id"] == series["case_id"]]
    result = export_volume_cases([case], {case["case_id"]: slices}, cfg=cfg, raw=str(tmp_path / "raw2"), storage=None)
    assert result["ignored"] == 1 and result["dropped"] == {"low_sam_score": 1}
    labels = np.asarray(nib.load(tmp_path / "raw2" / "labelsTr" / f"{case['case_id']}.nii.gz").dataobj)
    assert (labels[:, :, 2] == IGNORE).all() and labels[:, :, 1].sum() == 7 * 9  # slice 2 ignored, 1 kept
    assert (labels[:, :, 0] == 0).all() and (labels[:, :, 3] == 0).all()  # empty slices: background
    document = dataset_json_3d(cfg, 1, "CT", with_ignore=True)
    assert document["labels"] == {"background": 0, "lesion": 1, "ignore": 2}
    assert json.loads(json.dumps(document))["channel_names"] == {"0": "CT"}


def test_auto_configuration_and_channel_names():
    volume = {"kind": "nifti", "shape": [20, 24, 4]}
    image = {"kind": "image", "shape": [64, 64, 1]}
    assert resolve_configuration("auto", [volume, volume]) == Configuration.THREE_D
    assert resolve_configuration("auto", [volume, image]) == Configuration.TWO_D
    assert resolve_configuration("auto", []) == Configuration.TWO_D
    assert resolve_configuration("3d_fullres", [image]) == Configuration.THREE_D
    assert channel_name("auto", ["CT", "", "ct"]) == "CT"  # NIfTI cases (no modality) take the others'
    assert channel_name("auto", ["CT", "MR"]) == "zscore" and channel_name("auto", [""]) == "zscore"
    assert channel_name("MR", ["CT"]) == "MR"
    with pytest.raises(Exception, match="configuration"):
        load_weak_config(overrides=["configuration=3d"])
