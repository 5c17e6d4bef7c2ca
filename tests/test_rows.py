"""The pipeline's row format: case, chunk and slice rows, prompts and masks as they travel."""

from __future__ import annotations

import json

import numpy as np

from mcs_batch.errors import ErrorCode
from mcs_batch.records import CaseRecord, slice_axis_for
from mcs_batch.rows import (
    CASE_ROW,
    PromptRecord,
    case_of,
    case_row,
    chunk_row,
    fail_rows,
    model_rows,
    pack_mask,
    slice_row,
    unpack_mask,
)
from mcs_batch.stages.load import plan_case


def _record(shape=(40, 30, 37)) -> CaseRecord:
    return CaseRecord(case_id="c" * 24, kind="nifti", source_uris=["file:///x.nii"], source_keys=["x.nii"],
                      shape=list(shape), spacing_mm=[1.0, 1.0, 2.0], affine=np.eye(4).ravel().tolist())  # fmt: skip


def test_mask_packing_round_trip():
    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    np.testing.assert_array_equal(unpack_mask(pack_mask(mask), (37, 53)), mask)
    assert len(pack_mask(mask)) == (37 * 53 + 7) // 8


def test_prompt_record_round_trip():
    p = PromptRecord([[1.0, 2.0, 30.0, 40.0]], [[5.0, 6.0]], None, 1, 0.25, 0.9)
    back = PromptRecord.decode(p.encode())
    assert back == p
    assert back.boxes().shape == (1, 4) and back.boxes().dtype == np.float32
    assert back.points().tolist() == [[5.0, 6.0]]
    empty = PromptRecord.decode(PromptRecord([], [], ErrorCode.EMPTY_SALIENCY, 0, 0.0, 0.0).encode())
    assert empty.reason == "empty_saliency" and empty.boxes().shape == (0, 4) and empty.points().shape == (0, 2)


def test_plan_rows_cover_every_slice_once():
    record = _record()
    rows = plan_case(record, slice_chunk=16, axis=2)
    assert rows[0]["slice_index"] == CASE_ROW and rows[0]["n_slices"] == 37
    assert [(r["slice_index"], r["n_slices"]) for r in rows[1:]] == [(0, 16), (16, 16), (32, 5)]
    assert case_of(rows[2]) == record and json.loads(rows[0]["case_json"])["case_id"] == record.case_id
    assert [r["n_slices"] for r in plan_case(record, slice_chunk=16, axis=0)[1:]] == [16, 16, 8]  # 40 along i
    assert chunk_row(case_row(record, 37), 3, 2)["case_json"] == rows[0]["case_json"]


def test_slice_axis_of_2d_images_is_always_2():
    assert slice_axis_for(_record((64, 48, 1)), 0) == 2
    assert slice_axis_for(_record(), 0) == 0


def test_failed_rows_are_skipped_by_later_stages():
    rows = [slice_row("a", CASE_ROW, np.zeros((1, 1, 3), np.uint8), 0.0)]
    rows += [slice_row("a", k, np.zeros((4, 4, 3), np.uint8), 0.1) for k in range(3)]
    rows.append(slice_row("b", 0, np.zeros((1, 1, 3), np.uint8), 0.0, ErrorCode.DECODE_ERROR, "bad"))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    assert model_rows(batch) == [1, 2, 3]
    fail_rows(batch, [2], ErrorCode.MODEL_ERROR, "sam: boom")
    assert model_rows(batch) == [1, 3] and batch["error_message"][2] == "sam: boom"
