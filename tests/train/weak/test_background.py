"""Background in 2d training, and the same slice policy at prediction: empty slices of a volume are
trained in a controlled proportion (select.empty_slice_ratio, drawn per case with a seed), and refine
predicts the slices the ensemble was trained to judge (refine.slices auto: every slice when it saw
empty ones, else only the slices with a zero-shot mask)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcs_batch.errors import ConfigError
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.reader import read_mask
from mcs_batch.train.weak.config import SelectionConfig, ensemble_slices, load_weak_config
from mcs_batch.train.weak.export import export_cases, raw_folder
from mcs_batch.train.weak.select import pick_empty_slices, select_from_catalog
from mcs_batch.train.weak.synthetic import Noise, write_pseudo_run
from tests.train.weak.cases import add_series_case


def test_empty_slices_are_drawn_in_proportion_and_the_same_every_run():
    empty = list(range(40))
    cfg = SelectionConfig(empty_slice_ratio=0.5, seed=3)
    picked = pick_empty_slices(empty, 10, cfg, "case-a")
    assert len(picked) == 5 and set(picked) <= set(empty) and picked == sorted(picked)
    assert pick_empty_slices(empty, 10, cfg, "case-a") == picked  # seeded per case: the same slices
    assert pick_empty_slices(empty, 10, cfg, "case-b") != picked  # another case, other slices
    assert pick_empty_slices(empty, 10, SelectionConfig(empty_slice_ratio=0.5, seed=4), "case-a") != picked
    assert pick_empty_slices(empty, 100, cfg, "case-a") == empty  # at most all of them
    assert pick_empty_slices(empty, 10, SelectionConfig(empty_slice_ratio=0.0), "case-a") == []
    assert pick_empty_slices([7, 2], 0, SelectionConfig(keep_empty_slices=True), "c") == [2, 7]
    with pytest.raises(ConfigError, match="empty_slice_ratio"):
        SelectionConfig(empty_slice_ratio=-1.0)


@pytest.mark.parametrize(("ratio", "images", "dropped"), [(1.0, 4, {}), (0.5, 3, {"empty_slice": 1}),
                                                           (0.0, 2, {"empty_slice": 2})])  # fmt: skip
def test_a_series_exports_its_labelled_slices_and_empty_ones_in_proportion(tmp_path: Path, ratio, images, dropped):
    out = tmp_path / "out"
    catalog = Catalog(str(out))
    row = add_series_case(catalog, tmp_path / "ct")  # 4 slices: 1 and 2 with a mask, 0 and 3 empty
    cfg = load_weak_config(source=str(out), target="lesion", work=str(tmp_path / "w"),
                           overrides=[f"select.empty_slice_ratio={ratio}"])  # fmt: skip
    (case,) = select_from_catalog(catalog, "lesion", cfg.select).cases
    slices = [r for r in catalog.slices().to_pylist() if r["case_id"] == row["case_id"]]
    result = export_cases([case], {row["case_id"]: slices}, cfg=cfg, storage=None)
    assert len(result["rows"]) == images and result["dropped"] == dropped
    mask = read_mask(row["mask_uri"], None)
    raw = Path(raw_folder(cfg))
    for r in result["rows"]:
        label = np.asarray(Image.open(raw / "labelsTr" / f"{r['identifier']}.png"))
        k = r["slice_index"]
        assert np.array_equal(label, mask[:, :, k].T) and r["mask_pixels"] == int(label.sum())
        assert (label.sum() > 0) == (k in (1, 2))  # background slices: an all-zero label
    assert {r["slice_index"] for r in result["rows"]} >= {1, 2}


def test_refine_predicts_the_slices_the_training_policy_covered(tmp_path: Path):
    from mcs_batch.train.weak.ensemble import EnsemblePredictor
    from mcs_batch.train.weak.refine import labelled_slices, refine_case
    from mcs_batch.train.weak.synthetic_ensemble import write_random_ensemble

    out, work = tmp_path / "out", tmp_path / "work"
    catalog = Catalog(str(out))
    row = add_series_case(catalog, tmp_path / "ct")
    assert labelled_slices(read_mask(row["mask_uri"], None), axis=2) == {1, 2}
    write_random_ensemble(work, members=2, image_size=32, base_features=4, max_features=16)
    document = json.loads((work / "ensemble" / "ensemble.json").read_text())
    assert ensemble_slices("auto", document) == "all"  # no training config: nothing to follow

    predictor = EnsemblePredictor(str(work), storage=None)

    def refined(ratio: float, slices: str = "auto") -> dict:
        # the policy refine follows is the one in the ensemble's record of its training
        predictor.document = {**document, "config": {"select": {"empty_slice_ratio": ratio, "min_mask_pixels": 1}}}
        cfg = load_weak_config(source=str(out), target="lesion", work=str(work), overrides=[f"refine.slices={slices}"])
        result = refine_case(row, predictor, cfg=cfg, catalog=catalog, run_id="r", storage=None)
        return {**result["case_row"], "pixels": [s["mask_pixels"] for s in result["slice_rows"]],
                "mask": read_mask(result["case_row"]["mask_uri"], None)}  # fmt: skip

    everywhere = refined(1.0)  # trained with empty slices: every slice predicted
    only_labelled = refined(0.0)  # trained on labelled slices only: only those predicted
    assert ensemble_slices("auto", {"config": {"select": {"empty_slice_ratio": 0.0}}}) == "labelled"
    assert ensemble_slices("auto", {"configuration": "3d_fullres", "config": {"select": {}}}) == "all"
    assert only_labelled["pixels"][0] == only_labelled["pixels"][3] == 0
    assert not only_labelled["mask"][:, :, [0, 3]].any() and only_labelled["n_slices"] == 4
    # on the slices both predicted, the same network gives the same mask
    np.testing.assert_array_equal(only_labelled["mask"][:, :, 1:3], everywhere["mask"][:, :, 1:3])
    assert everywhere["uncertainty"] != only_labelled["uncertainty"]  # empty slices scored only when predicted
    assert refined(0.0, "all")["pixels"] == everywhere["pixels"]  # an explicit policy overrides the training's

    # a 2D image is always predicted (the paper's path), whatever the policy: even an empty zero-shot mask
    write_pseudo_run(tmp_path, str(out), n=1, noise=Noise(drop_fraction=1.0))
    (image,) = [r for r in catalog.cases().to_pylist() if r["kind"] == "image"]
    assert read_mask(image["mask_uri"], None).sum() == 0
    predictor.document = {**document, "config": {"select": {"empty_slice_ratio": 0.0, "min_mask_pixels": 1}}}
    cfg = load_weak_config(source=str(out), target="lesion", work=str(work))
    result = refine_case(image, predictor, cfg=cfg, catalog=catalog, run_id="r", storage=None)
    assert result["case_row"]["uncertainty"] > 0.0  # scored: the network was run on it
