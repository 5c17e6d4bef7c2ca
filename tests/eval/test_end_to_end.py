"""Segment a small synthetic labelled cohort with tiny models on a real local Ray, then evaluate it;
`reproduce` without data, and on a stand-in for the paper's four datasets in their public layout."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mcs_batch.cli import main
from mcs_batch.eval.datasets import PAPER_DATASETS
from mcs_batch.eval.evaluate import read_evaluation
from mcs_batch.scan import discover_cases
from mcs_batch.testdata.series import write_series
from tests.eval.cohort import blob_image, paper_dataset, save_mask_png, save_png


def dice_of(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def read_nifti(uri: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(Path(uri.removeprefix("file://")).read_bytes()))


@pytest.mark.usefixtures("ray_local")
def test_segment_then_evaluate_a_labelled_cohort(tmp_path: Path, capsys):
    images, truth = tmp_path / "in", tmp_path / "truth"
    rng = np.random.default_rng(3)
    for i in range(3):
        image, mask = blob_image(rng, 40, 48 + 8 * i)
        save_png(images / f"img{i}.png", image)
        save_mask_png(truth / f"img{i}_mask.png", mask)  # a mask suffix: matched by the naming rule
    write_series(images / "ct", rows=24, cols=20, n_slices=4, series_seed="e2e")
    (record,) = [r for r in discover_cases([str(images)]) if r.kind == "dicom_series"]
    blob = np.zeros(tuple(record.shape), bool)
    blob[6:14, 5:18, 1:3] = True
    nib.save(nib.Nifti1Image(blob.astype(np.uint8), np.asarray(record.affine).reshape(4, 4)), str(truth / "ct.nii.gz"))
    out = tmp_path / "out"

    cache = f"models.cache_dir={tmp_path.parent / 'model-cache'}"
    assert main(["segment", str(images), "--out", str(out), "--models", "tiny", "--prompt", "a bright lesion",
                 "--target", "lesion", "--set", cache]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", str(out), "--truth", str(truth), "--dataset", "cohort"]) == 0
    printed = capsys.readouterr().out
    assert "dataset cohort, target lesion: 4 truth case(s)" in printed

    rows = {r["truth_key"]: r for r in read_evaluation(str(out)).to_pylist()}
    assert sorted(rows) == ["ct", "img0", "img1", "img2"]
    for key, row in rows.items():
        assert row["status"] == "ok" and row["tiny_models"] is True and row["ablation"] == "full"
        predicted = np.asarray(read_nifti(row["mask_uri"]).dataobj) > 0
        if key == "ct":
            expected, ndim, unit = blob, 3, "mm"
        else:
            expected = (np.asarray(Image.open(truth / f"{key}_mask.png")) > 127).T[:, :, None]
            ndim, unit = 2, "px"
        assert (row["ndim"], row["unit"]) == (ndim, unit)
        assert row["dice"] == pytest.approx(dice_of(predicted, expected))  # the right files, the right frame
        assert row["truth_voxels"] == expected.sum() and row["pred_voxels"] == predicted.sum()
        assert 0.0 <= row["nsd"] <= 1.0 and row["hd95"] >= 0.0
    assert rows["ct"]["spacing"] == pytest.approx(np.linalg.norm(np.reshape(record.affine, (4, 4))[:3, :3], axis=0))


def test_reproduce_without_data_says_what_is_missing_and_where(tmp_path: Path, capsys):
    (tmp_path / "data" / "breast_tumors" / "test_images").mkdir(parents=True)  # no masks: not usable
    code = main(["reproduce", "--data", str(tmp_path / "data"), "--models", "tiny", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for d in PAPER_DATASETS:
        assert (
            f"{tmp_path / 'data' / d.folders[0]}/test_images/ and {tmp_path / 'data' / d.folders[0]}/test_masks/" in err
        )
    assert err.strip().splitlines()[-1].startswith("mcs-batch: error: cannot reproduce: 4 thing(s) missing")
    assert not (tmp_path / "o").exists()  # nothing was run
    assert main(["reproduce", "--data", str(tmp_path), "--datasets", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def stand_in(root: Path) -> Path:
    """The paper's four datasets, 2 images each, with per-dataset naming differences."""
    paper_dataset(root, "breast_tumors", 2, seed=1, mask_suffix="_mask")  # BUSI-style names
    paper_dataset(root, "brain_tumors", 2, seed=2)
    paper_dataset(root, "lung_xray", 2, seed=3, n_blobs=2)
    paper_dataset(root, "Lung_CT", 2, seed=4, n_blobs=2)  # folder names match in any case
    return root


@pytest.mark.usefixtures("ray_local")
def test_reproduce_on_a_stand_in_prints_the_full_table(tmp_path: Path, capsys):
    data, out = stand_in(tmp_path / "data"), tmp_path / "out"
    cache = f"models.cache_dir={tmp_path.parent / 'model-cache'}"
    code = main(["reproduce", "--data", str(data), "--models", "tiny", "--out", str(out), "--set", cache])
    printed = capsys.readouterr().out
    assert code == 0
    assert "TINY random models" in printed
    lines = printed.splitlines()
    ours = []
    for d in PAPER_DATASETS:
        (line,) = [x for x in lines if x.strip().startswith(d.title)]
        result = read_evaluation(str(out / d.name / "full")).to_pylist()
        assert len(result) == 2 and {r["status"] for r in result} == {"ok"}
        mean_dsc = 100 * np.mean([r["dice"] for r in result])
        mean_nsd = 100 * np.mean([r["nsd"] for r in result])
        cells = line.split()[len(d.title.split()) :]
        assert cells[0] == "2" and float(cells[1]) == pytest.approx(mean_dsc, abs=0.006)
        assert float(cells[2]) == d.paper_dsc and float(cells[3]) == pytest.approx(mean_dsc - d.paper_dsc, abs=0.011)
        assert float(cells[4]) == pytest.approx(mean_nsd, abs=0.006) and float(cells[5]) == d.paper_nsd
        ours.append(mean_dsc)
    (mean_line,) = [x for x in lines if x.strip().startswith("Mean")]
    assert float(mean_line.split()[1]) == pytest.approx(np.mean(ours), abs=0.006)
    assert float(mean_line.split()[2]) == pytest.approx(77.61, abs=0.006)
    run_docs = list((out / "lung_ct" / "full" / "runs").glob("*.json"))
    config = json.loads(run_docs[0].read_text())["config"]
    assert config["targets"][0]["coarse"]["k_components"] == 2 and config["window"]["ct_window"] == "lung"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_reproduce_ablation_rows(tmp_path: Path, capsys):
    data, out = stand_in(tmp_path / "data"), tmp_path / "out"
    cache = f"models.cache_dir={tmp_path.parent / 'model-cache'}"
    args = ["reproduce", "--data", str(data), "--models", "tiny", "--out", str(out), "--set", cache]
    assert main([*args, "--ablation", "--datasets", "breast_us"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for ablation, paper in (("saliency", 46.23), ("postprocess", 51.62), ("components", 57.89), ("full", 77.61)):
        (line,) = [x for x in lines if x.strip().startswith(ablation + " ")]
        rows = read_evaluation(str(out / "breast_us" / ablation)).to_pylist()
        assert {r["ablation"] for r in rows} == {ablation} and len(rows) == 2
        assert float(line.split()[1]) == pytest.approx(100 * np.mean([r["dice"] for r in rows]), abs=0.006)
        assert float(line.split()[2]) == paper
