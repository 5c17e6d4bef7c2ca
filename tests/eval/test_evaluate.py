"""`evaluate` on segment-run outputs written directly (no models, no Ray): matching, exact scores for
predictions equal to / shifted from the truth, honest counting of failures, the table it writes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mcs_batch.cli import main
from mcs_batch.eval.datasets import list_truth, mask_base, pair_images_masks
from mcs_batch.eval.evaluate import evaluate, read_evaluation
from mcs_batch.io.discover import ObjectRef
from mcs_batch.outputs.schema import EVALUATION_SCHEMA, EVALUATION_SCHEMA_VERSION
from tests.eval.cohort import FakeRun, blob_image, save_mask_png, save_png

AFFINE_3D = np.array([[-0.7, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def square(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


def cube(shape=(16, 14, 8)):
    mask = np.zeros(shape, bool)
    mask[4:10, 3:9, 2:6] = True
    return mask


def save_nifti(path: Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(path))
    return path


def by_key(rows):
    return {r["truth_key"]: r for r in rows}


def test_prediction_equal_to_truth_scores_exactly_one(tmp_path: Path, capsys):
    rng = np.random.default_rng(1)
    run, truth = FakeRun(tmp_path / "out"), tmp_path / "truth"
    for i in range(3):
        _, mask = blob_image(rng, 30 + 2 * i, 40)
        run.image(f"img{i}.png", mask)
        save_mask_png(truth / f"img{i}.png", mask)
    run.volume("c" * 24, ["ct/a.dcm", "ct/b.dcm"], cube(), AFFINE_3D)
    save_nifti(truth / "ct.nii.gz", cube(), AFFINE_3D)
    out = run.commit()

    code = main(["evaluate", out, "--truth", str(truth), "--dataset", "synthetic"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "dataset synthetic, target lesion: 4 truth case(s): ok 4, failed 0, missing 0" in printed
    assert "Dice %" in printed and "100.00" in printed
    rows = read_evaluation(out).to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert all((r["dice"], r["nsd"], r["hd95"]) == (1.0, 1.0, 0.0) for r in rows)
    volume = by_key(rows)["ct"]
    assert (volume["ndim"], volume["unit"], volume["matched_by"]) == (3, "mm", "key")
    assert volume["spacing"] == pytest.approx([0.7, 0.8, 2.5])
    assert volume["truth_voxels"] == volume["pred_voxels"] == cube().sum()
    image = by_key(rows)["img1"]
    assert (image["ndim"], image["unit"], image["shape"], image["tolerance"]) == (2, "px", [40, 32], 2.0)
    from deltalake import DeltaTable

    table = DeltaTable(str(Path(out) / "catalog" / "evaluation")).to_pyarrow_table()  # a Delta table
    assert table.schema.names == EVALUATION_SCHEMA.names and table.num_rows == 4
    assert table.schema.field(0).metadata == {b"mcs_batch.schema_version": EVALUATION_SCHEMA_VERSION.encode()}


def test_shifted_prediction_scores_as_computed_by_hand(tmp_path: Path):
    # The 10x10 square shifted by 3 columns (tests/eval/test_metrics.py works it out): Dice 0.7,
    # NSD at 2 px 44/72, HD95 3 px. The same shift along a 2.5 mm slice axis of a volume: 7.5 mm.
    run, truth = FakeRun(tmp_path / "out"), tmp_path / "truth"
    save_mask_png(truth / "sq.png", square((20, 24), (5, 14), (5, 14)))
    run.image("sq.png", square((20, 24), (5, 14), (8, 17)))
    save_nifti(truth / "ct.nii.gz", cube(), AFFINE_3D)
    run.volume("d" * 24, ["ct/a.dcm", "ct/b.dcm"], np.roll(cube(), 1, axis=2), AFFINE_3D)
    out = run.commit()
    result = evaluate(out, list_truth(str(truth)).items, truth_root=str(truth), dataset="shift", progress=print)
    rows = by_key(result.rows)
    assert rows["sq"]["dice"] == pytest.approx(0.7)
    assert rows["sq"]["nsd"] == pytest.approx(44 / 72)
    assert rows["sq"]["hd95"] == 3.0
    # Cube 6x6x4 voxels moved by one 2.5 mm slice: every face point within 2.5 mm of the other surface,
    # so NSD at 2 mm < 1 but at 2.5 mm = 1; Dice = 2 * 6*6*3 / (2 * 6*6*4).
    assert rows["ct"]["dice"] == pytest.approx(0.75)
    assert rows["ct"]["hd95"] == pytest.approx(2.5)
    assert rows["ct"]["nsd"] < 1.0
    wider = evaluate(out, list_truth(str(truth)).items, truth_root=str(truth), dataset="shift", tolerance=2.5)
    assert by_key(wider.rows)["ct"]["nsd"] == 1.0
    assert by_key(wider.rows)["sq"]["nsd"] == pytest.approx(44 / 72)  # the 3-pixel distances stay outside 2.5


def test_failed_and_missing_predictions_count_as_zero_and_truth_errors_are_listed(tmp_path: Path, capsys):
    run, truth = FakeRun(tmp_path / "out"), tmp_path / "truth"
    good = square((20, 24), (5, 14), (5, 14))
    for name in ("ok", "failed", "missing", "wrong_size"):
        save_mask_png(truth / f"{name}.png", good)
    run.image("ok.png", good)
    run.image("failed.png", None, status="failed", error_code="decode_error", shape_hw=(20, 24))
    run.image("wrong_size.png", good[:, :20])  # the truth is 24 wide: not the same image
    run.image("extra.png", good)  # a prediction without truth
    out = run.commit()

    code = main(["evaluate", out, "--truth", str(truth), "--dataset", "honest"])
    printed = capsys.readouterr().out
    assert code == 1  # some truth could not be compared
    rows = by_key(read_evaluation(out).to_pylist())
    assert {k: r["status"] for k, r in rows.items()} == {
        "ok": "ok", "failed": "failed", "missing": "missing", "wrong_size": "truth_error"}  # fmt: skip
    diagonal = float(np.hypot(24, 20))  # the extent of a 24 x 20 image, in pixels
    for key in ("failed", "missing"):
        assert (rows[key]["dice"], rows[key]["nsd"]) == (0.0, 0.0)
        assert rows[key]["hd95"] == pytest.approx(diagonal)
    assert rows["failed"]["error_code"] == "decode_error" and rows["missing"]["error_code"] == "no_prediction"
    assert rows["wrong_size"]["dice"] is None and "not the same image" in rows["wrong_size"]["error_message"]
    # Means over the three scored cases: (1 + 0 + 0) / 3.
    assert "ok 1, failed 1, missing 1 (both scored 0), truth errors 1 (not scored); 1 prediction(s) without truth" in (
        printed
    )
    dice_line = next(line for line in printed.splitlines() if line.strip().startswith("Dice %"))
    assert dice_line.split()[2:] == ["33.33", "0.00", "57.74", "3"]


def test_mapping_file_and_ambiguous_names(tmp_path: Path, capsys):
    run, truth = FakeRun(tmp_path / "out"), tmp_path / "truth"
    mask = square((20, 24), (5, 14), (5, 14))
    a = run.image("site1/scan.png", mask)
    run.image("site2/scan.png", mask)
    save_mask_png(truth / "labels" / "scan.png", mask)  # which scan? the name alone is ambiguous
    out = run.commit()
    assert main(["evaluate", out, "--truth", str(truth)]) == 1
    assert "matches 2 predictions" in capsys.readouterr().out
    mapping = tmp_path / "map.csv"
    mapping.write_text(f"truth,case_id\nlabels/scan.png,{a['case_id']}\n")
    assert main(["evaluate", out, "--truth", str(truth), "--mapping", str(mapping), "--dataset", "mapped"]) == 0
    (row,) = [r for r in read_evaluation(out).to_pylist() if r["dataset"] == "mapped"]
    assert (row["case_id"], row["matched_by"], row["dice"]) == (a["case_id"], "case_id", 1.0)
    mapping.write_text("truth,patient\nlabels/scan.png,x\n")
    assert main(["evaluate", out, "--truth", str(truth), "--mapping", str(mapping)]) == 2
    assert "needs a 'truth' column and exactly one of case_id" in capsys.readouterr().err


def test_nifti_truth_with_flipped_axes_is_reoriented_and_labels_selected(tmp_path: Path):
    run, truth = FakeRun(tmp_path / "out"), tmp_path / "truth"
    labels = cube().astype(np.uint8)
    labels[4:10, 3:9, 2:3] = 2  # a second label in the bottom slice
    run.volume("e" * 24, ["vol.nii.gz"], cube(), AFFINE_3D, kind="nifti")
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = labels.shape[0] - 1  # the same grid, i reversed
    save_nifti(truth / "vol.nii.gz", labels[::-1], AFFINE_3D @ flip)
    out = run.commit()
    items = list_truth(str(truth)).items
    (row,) = evaluate(out, items, truth_root=str(truth), dataset="d").rows
    assert (row["status"], row["dice"], row["truth_voxels"]) == ("ok", 1.0, cube().sum())
    (row,) = evaluate(out, items, truth_root=str(truth), dataset="d", label="1").rows
    assert row["truth_voxels"] == cube().sum() - 36 and row["dice"] < 1
    save_nifti(truth / "vol.nii.gz", labels, AFFINE_3D * np.array([[2], [1], [1], [1]]))  # another grid
    (row,) = evaluate(out, list_truth(str(truth)).items, truth_root=str(truth), dataset="d").rows
    assert row["status"] == "truth_error" and "resample" in row["error_message"]


def test_paper_layout_pairs_masks_by_the_naming_rule(tmp_path: Path):
    def refs(*names):
        return [ObjectRef(uri=f"file:///x/{n}", rel=n, size=1) for n in names]

    images = refs("benign (1).png", "benign (4).png", "normal (2).png", "other.jpg")
    masks = refs("benign (1)_mask.png", "benign (4)_mask.png", "benign (4)_mask_1.png", "other.png", "stray_mask.png")
    listing = pair_images_masks(images, masks)
    pairs = {i.key: [u.rsplit("/", 1)[1] for u in i.uris] for i in listing.items}
    assert pairs == {
        "benign (1)": ["benign (1)_mask.png"],
        "benign (4)": ["benign (4)_mask.png", "benign (4)_mask_1.png"],  # merged: one image, two lesions
        "other": ["other.png"],  # same name, another extension
    }
    assert sorted(listing.problems) == ["image without a mask: file:///x/normal (2).png",
                                        "mask without an image: file:///x/stray_mask.png"]  # fmt: skip
    assert mask_base("a/b_Seg.png") == "a/b" and mask_base("a/b-gt.nii.gz") == "a/b" and mask_base("mask.png") == "mask"


def test_two_masks_of_one_busi_image_are_scored_as_their_union(tmp_path: Path):
    run, truth = FakeRun(tmp_path / "out"), tmp_path / "data" / "breast_tumors"
    left, right = square((20, 30), (5, 10), (2, 8)), square((20, 30), (5, 10), (18, 25))
    save_mask_png(truth / "test_masks" / "benign (4)_mask.png", left)
    save_mask_png(truth / "test_masks" / "benign (4)_mask_1.png", right)
    save_mask_png(truth / "test_images" / "benign (4).png", left)  # the image itself: any PNG
    run.image("benign (4).png", left | right)
    out = run.commit()
    (row,) = evaluate(out, list_truth(str(truth)).items, truth_root=str(truth), dataset="busi").rows
    assert (row["matched_by"], row["dice"], row["truth_voxels"]) == ("key", 1.0, (left | right).sum())


def test_no_truth_and_no_predictions_are_one_line_errors(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    out = FakeRun(tmp_path / "out").commit()
    assert main(["evaluate", out, "--truth", str(tmp_path / "empty")]) == 2
    assert "no ground truth found" in capsys.readouterr().err
    save_mask_png(tmp_path / "truth" / "a.png", square((8, 8), (1, 3), (1, 3)))
    assert main(["evaluate", out, "--truth", str(tmp_path / "truth")]) == 2
    assert "the catalog has no cases" in capsys.readouterr().err


def test_a_folder_mixing_images_and_masks_uses_the_masks(tmp_path: Path):
    # BUSI's own release: benign/benign (1).png (the image) beside benign/benign (1)_mask.png.
    rng = np.random.default_rng(5)
    image, mask = blob_image(rng, 30, 36)
    data = tmp_path / "Dataset_BUSI_with_GT"
    save_png(data / "benign" / "benign (1).png", image)
    save_mask_png(data / "benign" / "benign (1)_mask.png", mask)
    listing = list_truth(str(data))
    assert [(i.key, len(i.uris)) for i in listing.items] == [("benign/benign (1)", 1)]
    assert [u.rsplit("/", 1)[1] for u in listing.ignored] == ["benign (1).png"]
    run = FakeRun(tmp_path / "out")
    run.image("benign/benign (1).png", mask)
    (row,) = evaluate(run.commit(), listing.items, truth_root=str(data), dataset="busi").rows
    assert (row["matched_by"], row["dice"]) == ("key", 1.0)
