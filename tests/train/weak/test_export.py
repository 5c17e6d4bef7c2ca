"""Selection + export of a synthetic run's pseudo-labels into nnU-Net's raw layout, on a real local Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.train.weak.config import load_weak_config
from mcs_batch.train.weak.export import export_dataset, raw_folder, read_mapping
from mcs_batch.train.weak.select import select_from_catalog
from mcs_batch.train.weak.synthetic import Noise, write_pseudo_run

QUIET = {"progress": lambda message: None}


@pytest.mark.usefixtures("ray_local")
def test_export_writes_images_labels_and_a_mapping_back_to_slices(tmp_path: Path):
    out, work = tmp_path / "out", tmp_path / "work"
    truth = write_pseudo_run(tmp_path, str(out), n=6, noise=Noise(drop_fraction=0.0, max_shift=0))
    dropped_case = sorted(truth)[0]
    cfg = load_weak_config(source=str(out), target="lesion", work=str(work),
                           overrides=[f"select.exclude=[{dropped_case}]"])  # fmt: skip
    selection = select_from_catalog(Catalog(str(out)), "lesion", cfg.select)
    export = export_dataset(cfg, selection, storage=None, **QUIET)
    assert export["images"] == 5 and export["cases"] == 5

    raw = Path(raw_folder(cfg))
    dataset = json.loads((raw / "dataset.json").read_text())
    assert dataset["numTraining"] == 5 and dataset["file_ending"] == ".png"
    assert dataset["labels"] == {"background": 0, "lesion": 1} and len(dataset["channel_names"]) == 3
    mapping = read_mapping(str(work), None).to_pylist()
    assert sorted(r["case_id"] for r in mapping) == sorted(set(truth) - {dropped_case})
    for r in mapping:
        image = np.asarray(Image.open(raw / "imagesTr" / f"{r['identifier']}_0000.png"))
        label = np.asarray(Image.open(raw / "labelsTr" / f"{r['identifier']}.png"))
        source = np.asarray(Image.open(tmp_path / truth[r["case_id"]]["key"]))
        assert image.shape == (64, 64, 3) and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        # the plane the job saw (windowed as the job windows it), in the same frame: not transposed
        assert np.corrcoef(image[..., 0].ravel(), source.ravel())[0, 1] > 0.95
        assert np.corrcoef(image[..., 0].ravel(), source.T.ravel())[0, 1] < 0.9
        assert np.array_equal(label > 0, truth[r["case_id"]]["pseudo"])  # the pseudo-label, not transposed
        assert r["slice_index"] == 0 and r["dataset"] == "cohort" and r["agreement"] > 0.5


@pytest.mark.usefixtures("ray_local")
def test_slice_filters_drop_low_scores_and_disagreeing_masks(tmp_path: Path):
    out = tmp_path / "out"

    def edit(i: int, slice_row: dict) -> None:
        if i == 0:
            slice_row["sam_score"] = 0.2  # a low SAM score
        if i == 1:
            slice_row["boxes_xyxy"] = [[0.0, 0.0, 4.0, 4.0]]  # saliency somewhere else

    write_pseudo_run(tmp_path, str(out), n=4, noise=Noise(max_shift=0, drop_fraction=0.0), edit_slice=edit)
    cfg = load_weak_config(source=str(out), target="lesion", work=str(tmp_path / "w"),
                           overrides=["select.min_sam_score=0.5", "select.min_agreement=0.3"])  # fmt: skip
    selection = select_from_catalog(Catalog(str(out)), "lesion", cfg.select)
    export = export_dataset(cfg, selection, storage=None, **QUIET)
    assert export["images"] == 2 and export["slices_dropped"] == {"low_sam_score": 1, "low_agreement": 1}


def test_png_roundtrip_keeps_label_values():
    from mcs_batch.train.weak.export import png

    label = np.zeros((5, 7), np.uint8)
    label[1:3, 2:6] = 1
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png(label)))), label)


@pytest.mark.usefixtures("ray_local")
def test_selection_and_export_from_and_to_object_storage(tmp_path: Path, s3_server, s3_bucket):
    from mcs_batch.io.storage import StorageOptions

    bucket, fs = s3_bucket
    storage = StorageOptions(**s3_server)
    out, work = f"s3://{bucket}/out", f"s3://{bucket}/weak/lesion"
    write_pseudo_run(tmp_path, out, n=3, storage=storage)
    cfg = load_weak_config(source=out, target="lesion", work=work)
    selection = select_from_catalog(Catalog(out, storage=storage), "lesion", cfg.select)
    export = export_dataset(cfg, selection, storage=storage, **QUIET)
    assert export["images"] == 3
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/weak/lesion/nnUNet_raw"))
    assert len(names) == 7 and sum(n.endswith("_0000.png") for n in names) == 3 and "dataset.json" in names
    assert len(read_mapping(work, storage)) == 3


@pytest.mark.usefixtures("ray_local")
def test_a_dicom_series_exports_its_masked_slices_in_the_display_frame(tmp_path: Path):
    from mcs_batch.io.volume import plane
    from mcs_batch.train.weak.export import read_mask
    from tests.train.weak.cases import add_series_case

    out = tmp_path / "out"
    catalog = Catalog(str(out))
    row = add_series_case(catalog, tmp_path / "ct")
    cfg = load_weak_config(
        source=str(out), target="lesion", work=str(tmp_path / "w"), overrides=["select.empty_slice_ratio=0"]
    )  # labelled slices only (test_background.py)
    export = export_dataset(cfg, select_from_catalog(catalog, "lesion", cfg.select), storage=None, **QUIET)
    assert export["images"] == 2 and export["slices_dropped"] == {"empty_slice": 2}
    mask = read_mask(row["mask_uri"], None)
    raw = Path(raw_folder(cfg))
    for r in read_mapping(str(tmp_path / "w"), None).to_pylist():
        assert r["slice_index"] in (1, 2) and r["agreement"] > 0.9
        label = np.asarray(Image.open(raw / "labelsTr" / f"{r['identifier']}.png"))
        image = np.asarray(Image.open(raw / "imagesTr" / f"{r['identifier']}_0000.png"))
        assert label.shape == image.shape[:2] == (24, 20)  # rows x columns of the DICOM frame
        assert np.array_equal(label, plane(mask, r["slice_index"], 2)) and label.sum() == 7 * 9


@pytest.mark.usefixtures("ray_local")
def test_a_nifti_stored_ras_exports_label_and_image_in_the_same_display_frame(tmp_path: Path):
    from mcs_batch.io.volume import plane
    from tests.train.weak.cases import add_nifti_case

    out = tmp_path / "out"
    catalog = Catalog(str(out))
    _, mask = add_nifti_case(catalog, tmp_path / "nifti")
    cfg = load_weak_config(
        source=str(out), target="lesion", work=str(tmp_path / "w"), overrides=["select.empty_slice_ratio=0"]
    )  # labelled slices only
    export = export_dataset(cfg, select_from_catalog(catalog, "lesion", cfg.select), storage=None, **QUIET)
    assert export["images"] == 2 and export["slices_dropped"] == {"empty_slice": 2}
    raw = Path(raw_folder(cfg))
    for r in read_mapping(str(tmp_path / "w"), None).to_pylist():
        assert r["slice_index"] in (1, 2) and r["agreement"] > 0.9
        label = np.asarray(Image.open(raw / "labelsTr" / f"{r['identifier']}.png"))
        image = np.asarray(Image.open(raw / "imagesTr" / f"{r['identifier']}_0000.png"))[..., 0]
        assert label.shape == image.shape == (24, 20)
        # the stored plane flipped on both axes (R, A -> L, P), and on the image's bright block
        np.testing.assert_array_equal(label, plane(mask, r["slice_index"], 2)[::-1, ::-1])
        assert image[label == 1].min() == 255 and image[label == 0].max() == 0
