"""Training on Ray Train (2 workers, a tiny nnU-Net found through nnUNet_extTrainer): interrupted after its
first checkpoint, resumed, finished; then refinement writes <target>@weak beside the zero-shot rows,
which `query` lists and `evaluate` scores."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mcs_batch.cli import main
from mcs_batch.eval.evaluate import read_evaluation
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.query import query
from mcs_batch.train.weak.config import load_weak_config
from mcs_batch.train.weak.synthetic import write_pseudo_run
from mcs_batch.train.weak.train import TrainWeakError, newest_checkpoint_state, train_weak
from tests.train.weak.cases import add_series_case

QUIET = {"progress": lambda message: None}
TINY = [  # 2 cycles of 2 epochs, the last epoch of each kept; 1 iteration each; 4..64 features
    "train.cycles=2", "train.epochs_per_cycle=2", "train.keep_per_cycle=1", "train.iterations_per_epoch=1",
    "train.val_iterations_per_epoch=1", "train.base_features=4", "run.num_workers=2", "run.cpus_per_worker=0.5",
]  # fmt: skip


def nifti(uri: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(Path(uri.removeprefix("file://")).read_bytes()))


@pytest.mark.usefixtures("ray_local")
def test_interrupted_training_resumes_then_refined_masks_sit_beside_zero_shot(tmp_path: Path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    truth = write_pseudo_run(tmp_path, str(out), n=8)
    marker = tmp_path / "interrupted"
    interrupt = ["testing.interrupt_after_step=1", f"testing.fault_marker={marker}"]
    cfg = load_weak_config(source=str(out), target="lesion", work=str(work), overrides=[*TINY, *interrupt])

    with pytest.raises(TrainWeakError, match="run the same command again to resume"):
        train_weak(cfg, **QUIET)
    assert marker.exists() and newest_checkpoint_state(cfg, None)["epoch"] == 1
    selection = json.loads((work / "selection.json").read_text())
    assert selection["cases"]["selected"] == 8 and selection["export"]["images"] == 8

    ensemble = train_weak(cfg, **QUIET)  # the same command again
    training = ensemble["training"]
    assert training["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in training["history"]] == [2, 3, 4]  # only what was left was trained
    assert [h["kept"] for h in training["history"]] == [True, False, True]
    files = [m["file"] for m in ensemble["members"]]  # 2 workers x 2 cycles x 1 kept epoch
    assert files == ["member00_cycle00_epoch0001.pt", "member00_cycle01_epoch0003.pt",
                     "member01_cycle00_epoch0001.pt", "member01_cycle01_epoch0003.pt"]  # fmt: skip
    assert json.loads((work / "ensemble" / "ensemble.json").read_text())["members"] == ensemble["members"]
    said = []
    assert train_weak(cfg, progress=said.append)["members"] == ensemble["members"]  # finished: nothing to redo
    assert said[1:] == [f"reusing training {ensemble['identity']}: labels unchanged",
                        f"reusing the selection and export in {work} (8 images)",
                        f"run train-weak under {work} is already trained (4 checkpoints)"]  # fmt: skip

    catalog = Catalog(str(out))
    series = add_series_case(catalog, tmp_path / "ct")  # a volume too: refined slice by slice, same geometry
    capsys.readouterr()
    sets = [arg for item in TINY for arg in ("--set", item)]
    assert main(["refine", "--from", str(out), "--target", "lesion", "--work", str(work), *sets]) == 0
    assert "refined target lesion@weak: 9 ok, 0 failed" in capsys.readouterr().out
    _, rows = query(str(out), "SELECT target, status, count(*) FROM cases GROUP BY target, status ORDER BY target")
    assert rows == [("lesion", "ok", 9), ("lesion@weak", "ok", 9)]
    cases = {(r["case_id"], r["target"]): r for r in catalog.cases().to_pylist()}
    for case_id in truth:
        zero, weak = cases[(case_id, "lesion")], cases[(case_id, "lesion@weak")]
        assert weak["mask_uri"] != zero["mask_uri"] and weak["source_keys"] == zero["source_keys"]
        a, b = nifti(zero["mask_uri"]), nifti(weak["mask_uri"])
        assert a.shape == b.shape == (64, 64, 1) and np.allclose(a.affine, b.affine)  # the same geometry
        assert weak["mask_voxels"] == int(np.asarray(b.dataobj).sum()) and weak["n_slices"] == 1
        assert weak["uncertainty"] >= 0.0 and weak["uncertainty_spread"] >= 0.0  # catalog columns ...
        assert zero["uncertainty"] is None  # ... of the refined target only
        assert np.array_equal(np.asarray(a.dataobj)[:, :, 0].T > 0, truth[case_id]["pseudo"])  # zero-shot untouched
    volume = cases[(series["case_id"], "lesion@weak")]
    refined = nifti(volume["mask_uri"])
    assert refined.shape == (20, 24, 4) and np.allclose(refined.affine, np.reshape(series["affine"], (4, 4)))
    assert volume["n_slices"] == 4 and volume["mask_png_uri"] is None and volume["modality"] == "CT"
    slices = [r for r in catalog.slices().to_pylist() if r["target"] == "lesion@weak"]
    assert len(slices) == 8 + 4
    assert sorted(r["slice_index"] for r in slices if r["case_id"] == series["case_id"]) == [0, 1, 2, 3]
    (record,) = [p for p in (out / "runs").glob("*-refine-*.json")]
    uncertainty = json.loads(record.read_text())["uncertainty"]
    assert len(uncertainty) == 9 and all(np.isfinite(u["uncertainty"]) and u["uncertainty"] >= 0 for u in uncertainty)
    assert list((work / "refine").glob("*.parquet"))

    assert main(["evaluate", str(out), "--truth", str(tmp_path / "truth"), "--dataset", "synthetic",
                 "--target", "lesion@weak"]) == 0  # fmt: skip
    scored = [r for r in read_evaluation(str(out)).to_pylist() if r["target"] == "lesion@weak"]
    assert len(scored) == 8 and all(r["status"] == "ok" and 0.0 <= r["dice"] <= 1.0 for r in scored)

    capsys.readouterr()
    assert main(["refine", "--from", str(out), "--target", "lesion", "--work", str(work)]) == 0
    assert "refined target lesion@weak: 0 ok" in capsys.readouterr().out  # committed pairs are skipped
