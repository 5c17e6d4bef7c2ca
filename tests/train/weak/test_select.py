"""Pseudo-label filters on hand-built catalog rows and masks."""

from __future__ import annotations

import numpy as np
import pytest

from mcs_batch.errors import ConfigError
from mcs_batch.train.weak.config import SelectionConfig
from mcs_batch.train.weak.select import agreement, dataset_of, select_cases, slice_drop_reason


def row(case_id: str, **extra) -> dict:
    base = {"case_id": case_id, "target": "lesion", "status": "ok", "mask_uri": f"file:///m/{case_id}.nii.gz",
            "mask_voxels": 50, "n_components": 1, "source_keys": [f"busi/{case_id}.png"]}  # fmt: skip
    return {**base, **extra}


def test_case_filters_drop_with_a_reason_each():
    rows = [
        row("a"),
        row("b", status="failed"),
        row("c", mask_voxels=0),
        row("d", mask_uri=None),
        row("e", n_components=5),
        row("f"),
        row("g", target="other"),
    ]
    cfg = SelectionConfig(max_components=2, exclude=("f",))
    selection = select_cases(rows, "lesion", cfg)
    assert [c["case_id"] for c in selection.cases] == ["a"]
    assert selection.considered == 6  # the other target's row is not considered at all
    assert dict(selection.dropped) == {
        "status_failed": 1, "empty_mask": 2, "too_many_components": 1, "excluded": 1,
    }  # fmt: skip
    assert selection.record()["per_dataset"] == {"busi": 1}


def test_include_list_and_per_dataset_caps_are_stable():
    rows = [row(f"u{i}", source_keys=[f"udiat/u{i}.png"]) for i in range(5)]
    rows += [row(f"b{i}") for i in range(3)]
    cfg = SelectionConfig(max_cases_per_dataset=2, seed=7)
    first = select_cases(rows, "lesion", cfg)
    again = select_cases(list(reversed(rows)), "lesion", cfg)
    assert [c["case_id"] for c in first.cases] == [c["case_id"] for c in again.cases]
    assert first.record()["per_dataset"] == {"busi": 2, "udiat": 2}
    assert first.dropped["dataset_cap"] == 4
    only = select_cases(rows, "lesion", SelectionConfig(include=("u1", "b2")))
    assert [c["case_id"] for c in only.cases] == ["b2", "u1"] and only.dropped["not_included"] == 6


def test_dataset_is_the_first_folder_of_the_first_key():
    assert dataset_of(["busi/benign/x.png"]) == "busi"
    assert dataset_of(["x.png"]) == "" and dataset_of(None) == ""


def test_agreement_is_the_iou_of_mask_and_prompt_boxes():
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True  # bbox x 10..20, y 5..15
    assert agreement(mask, [[10, 5, 20, 15]]) == pytest.approx(1.0)
    assert agreement(mask, [[10, 5, 15, 15]]) == pytest.approx(0.5)
    assert agreement(mask, [[10, 5, 12, 10], [18, 12, 20, 15]]) == pytest.approx(1.0)  # the box around all
    assert agreement(mask, []) == 0.0 and agreement(np.zeros((4, 4), bool), [[0, 0, 2, 2]]) == 0.0


def test_slice_filters():
    cfg = SelectionConfig(min_sam_score=0.6, min_agreement=0.5, min_mask_pixels=10)
    assert slice_drop_reason(100, 0.9, 0.8, cfg) is None
    assert slice_drop_reason(100, 0.5, 0.8, cfg) == "low_sam_score"
    assert slice_drop_reason(100, None, 0.8, cfg) == "low_sam_score"
    assert slice_drop_reason(100, 0.9, 0.2, cfg) == "low_agreement"
    assert slice_drop_reason(5, 0.9, 0.8, cfg) == "empty_slice"
    keep_empty = SelectionConfig(keep_empty_slices=True)
    assert slice_drop_reason(0, None, 0.0, keep_empty) is None


def test_bad_filter_values_are_config_errors():
    with pytest.raises(ConfigError, match="min_sam_score"):
        SelectionConfig(min_sam_score=1.5)


def test_a_second_round_drops_cases_an_earlier_ensemble_found_uncertain(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mcs_batch.train.weak.select import read_uncertainty

    refine = tmp_path / "refine"
    refine.mkdir()
    pq.write_table(pa.Table.from_pylist([{"case_id": "a", "uncertainty": 5.0}, {"case_id": "b", "uncertainty": 0.5}]),
                   refine / "20261201T000000Z-refine-aaaaaa.parquet")  # fmt: skip
    pq.write_table(pa.Table.from_pylist([{"case_id": "a", "uncertainty": 0.8}]),
                   refine / "20261201T010000Z-refine-bbbbbb.parquet")  # fmt: skip
    uncertainty = read_uncertainty(str(refine))
    assert uncertainty == {"a": 0.8, "b": 0.5}  # the newest run wins
    cfg = SelectionConfig(max_uncertainty=0.6, uncertainty_from=str(refine))
    selection = select_cases([row("a"), row("b"), row("c")], "lesion", cfg, uncertainty)
    assert [c["case_id"] for c in selection.cases] == ["b"]
    assert dict(selection.dropped) == {"too_uncertain": 1, "no_uncertainty": 1}
    with pytest.raises(ConfigError, match="uncertainty_from"):
        SelectionConfig(max_uncertainty=1.0)
