"""A tiny volume cohort (two NIfTI volumes, one stored R, A, S and one L, P, S, and a CT DICOM series)
through segment -> train-weak -> refine from the command line, in nnU-Net's 3d_fullres (configuration
auto): the exported volumes hold the source's values in HU, nnU-Net plans its CT normalisation from
them, refined masks have the source's shape and affine, and the DICOM case gets a DICOM SEG."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from mcs_batch.cli import main
from mcs_batch.io.load import load_case
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.reader import record_of
from mcs_batch.testdata.series import write_series

TINY = [  # see test_train_refine.py: 2 cycles of 2 epochs, 1 iteration each, 4..32 features
    "train.cycles=2", "train.epochs_per_cycle=2", "train.keep_per_cycle=1", "train.iterations_per_epoch=1",
    "train.val_iterations_per_epoch=1", "train.base_features=4", "run.num_workers=1", "run.cpus_per_worker=0.5",
]  # fmt: skip
SHAPE = (32, 32, 12)


def ct_volume(seed: int) -> np.ndarray:
    """float32 [32, 32, 12] in HU: air, a body (40 HU) and a bright blob (300 HU), a little texture."""
    i, j, k = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]].astype(np.float32)
    volume = np.full(SHAPE, -1000.0, np.float32)
    volume[((i - 16) / 14.4) ** 2 + ((j - 16) / 14.4) ** 2 <= 1] = 40.0
    volume[((i - 13) / 6.4) ** 2 + ((j - 16) / 6.4) ** 2 + ((k - 6) / 4.2) ** 2 <= 1] = 300.0
    return volume + np.random.default_rng(seed).integers(0, 7, SHAPE).astype(np.float32)


def nifti(path_or_uri) -> nib.Nifti1Image:
    data = Path(str(path_or_uri).removeprefix("file://")).read_bytes()
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_volume_cohort_trains_and_refines_in_3d_from_the_command_line(tmp_path: Path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    affines = {"ras.nii.gz": np.diag([0.8, 0.8, 2.5, 1.0]), "lps.nii.gz": np.diag([-0.9, -0.9, 2.0, 1.0])}
    for seed, (name, affine) in enumerate(affines.items()):
        nib.save(nib.Nifti1Image(ct_volume(seed), affine), images / name)
    write_series(images / "ct", rows=32, cols=32, n_slices=12, series_seed="weak3d")
    out, work = tmp_path / "out", tmp_path / "work"
    cache = f"models.cache_dir={tmp_path.parent / 'model-cache'}"
    # ablation=components: the saliency's coarse masks (tiny random SAM weights leave SAM's empty)
    assert main(["segment", str(images), "--out", str(out), "--models", "tiny", "--prompt", "a bright blob",
                 "--target", "lesion", "--set", cache, "--set", "ablation=components",
                 "--set", "outputs.dicom_seg=true"]) == 0  # fmt: skip
    catalog = Catalog(str(out))
    zero_shot = {r["case_id"]: r for r in catalog.cases().to_pylist() if r["target"] == "lesion"}
    assert len(zero_shot) == 3 and all(r["status"] == "ok" and r["mask_voxels"] > 0 for r in zero_shot.values())
    capsys.readouterr()

    sets = [arg for item in TINY for arg in ("--set", item)]
    code = main(["train-weak", "--from", str(out), "--target", "lesion", "--work", str(work), *sets])
    printed = "".join(capsys.readouterr())  # progress lines on stderr, the summary on stdout
    assert code == 0, printed
    assert "exported 3 pseudo-labelled volume(s) of 3 case(s)" in printed and "(3d_fullres)" in printed
    export = json.loads((work / "selection.json").read_text())["export"]
    assert export["configuration"] == "3d_fullres" and export["channel"] == "CT"  # the series says CT
    assert export["modalities"] == {"CT": 1, "unknown": 2}  # NIfTI headers carry no modality
    ensemble = json.loads((work / "ensemble" / "ensemble.json").read_text())
    assert ensemble["configuration"] == "3d_fullres" and len(ensemble["members"]) == 2

    # values in physical units reach nnU-Net: the exported volumes are the sources' HU ...
    raw = work / "nnUNet_raw" / "Dataset501_lesion"
    labelled = []  # the HU under the pseudo-labels, every case
    for case_id, row in zero_shot.items():
        exported = nifti(raw / "imagesTr" / f"{case_id}_0000.nii.gz")
        source = load_case(record_of(row))
        canonical = nib.as_closest_canonical(exported)
        source_canonical = nib.as_closest_canonical(nib.Nifti1Image(source.array, source.affine))
        np.testing.assert_array_equal(np.asarray(canonical.dataobj), np.asarray(source_canonical.dataobj))
        np.testing.assert_allclose(canonical.affine, source_canonical.affine, atol=1e-4)
        values = np.asarray(exported.dataobj)
        assert values.min() == -1000.0 and values.max() >= 300.0  # air and the blob, in HU
        labels = np.asarray(nifti(raw / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        assert labels.shape == values.shape and labels.sum() == row["mask_voxels"]  # the zero-shot mask, whole
        labelled.append(values[labels == 1])
    labelled = np.concatenate(labelled)
    # ... nnU-Net's fingerprint saw them and its plans normalise them as CT, in 3D
    preprocessed = work / "nnUNet_preprocessed" / "Dataset501_lesion"
    fingerprint = json.loads((preprocessed / "dataset_fingerprint.json").read_text())
    foreground = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    # (the tiny models' masks fall anywhere: on air, body or blob; windowed 8-bit would read 0..255)
    assert labelled.min() <= foreground["min"] <= foreground["median"] <= foreground["max"] <= labelled.max()
    assert foreground["percentile_00_5"] >= -1000.0 and foreground["percentile_99_5"] <= 306.0
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    assert plans["normalization_schemes"] == ["CTNormalization"] and len(plans["patch_size"]) == 3

    assert main(["refine", "--from", str(out), "--target", "lesion", "--work", str(work), *sets]) == 0
    assert "refined target lesion@weak: 3 ok, 0 failed" in capsys.readouterr().out
    refined = {r["case_id"]: r for r in Catalog(str(out)).cases().to_pylist() if r["target"] == "lesion@weak"}
    assert set(refined) == set(zero_shot)
    for case_id, row in refined.items():
        mask = nifti(row["mask_uri"])
        source_affine = np.reshape(zero_shot[case_id]["affine"], (4, 4))
        assert mask.shape == SHAPE and np.allclose(mask.affine, source_affine, atol=1e-4)  # the source geometry
        assert row["mask_voxels"] == int(np.asarray(mask.dataobj).sum()) and row["n_slices"] == SHAPE[2]
        assert row["status"] == "ok" and row["uncertainty"] >= 0.0
        if row["kind"] == "nifti":
            key = zero_shot[case_id]["source_keys"][0]
            assert np.allclose(mask.affine, affines[key.rsplit("/", 1)[-1]])  # the file's own affine
            assert row["seg_uri"] is None
    (dicom,) = [r for r in refined.values() if r["kind"] == "dicom_series"]
    assert dicom["seg_uri"] and dicom["seg_uri"] != zero_shot[dicom["case_id"]]["seg_uri"]
    seg = pydicom.dcmread(dicom["seg_uri"].removeprefix("file://"))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "lesion@weak"
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               for p in (images / "ct").iterdir()}  # fmt: skip
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == sources
    mask = np.asarray(nifti(dicom["mask_uri"]).dataobj)
    frames = seg.pixel_array.reshape(-1, 32, 32)
    assert int(frames.sum()) == int(mask.sum())  # the SEG holds the refined mask, every voxel of it
