"""CPU stages: plan each case into a case row plus chunks of slices, then decode chunks into images.

Pure functions on records and arrays, wrapped as Ray Data batch functions at the bottom. A volume
is decoded `slice_chunk` slices at a time, so no worker holds a whole long series. Row format:
mcs_batch.rows.
"""

from __future__ import annotations

import time

import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.load import load_case
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.io.window import to_model_rgb
from mcs_batch.records import CaseRecord, Status, slice_axis_for
from mcs_batch.rows import CASE_ROW, NO_IMAGE, case_of, case_row, chunk_row, columns, slice_row


def plan_case(record: CaseRecord, *, slice_chunk: int, axis: int) -> list[dict]:
    """One case row, then one chunk row per `slice_chunk` slices (none for cases that are not ok)."""
    n = record.shape[slice_axis_for(record, axis)] if record.status == Status.OK else 0
    head = case_row(record, n)
    return [head] + [chunk_row(head, k0, min(k0 + slice_chunk, n) - k0) for k0 in range(0, n, slice_chunk)]


def load_chunk(record: CaseRecord, k0: int, k1: int, cfg: JobConfig, *, fs) -> list[np.ndarray]:
    """Slices k0..k1-1 along the case's slice axis as model input: uint8 RGB [H, W, 3] each
    (windowed for the modality). The job and `explain` both read slices through this."""
    axis = slice_axis_for(record, cfg.slice_axis)
    if axis == 2:
        volume = load_case(record, fs=fs, slices=slice(k0, k1))
        planes = [volume.slice_image(k - k0) for k in range(k0, k1)]
    else:  # other axes need the whole volume
        volume = load_case(record, fs=fs)
        planes = [volume.slice_image(k, axis=axis) for k in range(k0, k1)]
    return [to_model_rgb(p, modality=record.modality, settings=cfg.window) for p in planes]


# -- Ray Data wrappers ------------------------------------------------------------------------------


def plan_batch(row: dict, *, cfg: JobConfig, skip: frozenset[str]) -> list[dict]:
    """flat_map: a manifest row -> case row + chunk rows; cases in `skip` (all targets committed) vanish."""
    record = CaseRecord.from_row(row)
    if record.case_id in skip:
        return []
    return plan_case(record, slice_chunk=cfg.resources.slice_chunk, axis=cfg.slice_axis)


def load_batch(batch: dict, *, cfg: JobConfig, storage: StorageOptions | None) -> dict:
    """map_batches: chunk rows -> slice rows (images); case rows pass through. Never raises for a case:
    a chunk that cannot be decoded becomes error rows (one per slice, so the writer's count holds)."""
    rows: list[dict] = []
    for case_id, k0, n, case_json in zip(
        batch["case_id"], batch["slice_index"], batch["n_slices"], batch["case_json"], strict=True
    ):
        k0, n = int(k0), int(n)
        if k0 == CASE_ROW:
            rows.append({**slice_row(case_id, CASE_ROW, NO_IMAGE, 0.0), "n_slices": n, "case_json": case_json})
            continue
        record = case_of({"case_json": case_json})
        start = time.perf_counter()
        try:
            fs = filesystem_for(record.source_uris[0], storage)[0]
            images = load_chunk(record, k0, k0 + n, cfg, fs=fs)
        except CaseError as e:
            rows.extend(slice_row(case_id, k, NO_IMAGE, 0.0, e.code, e.message) for k in range(k0, k0 + n))
            continue
        except Exception as e:  # a decoder bug must not kill the job: this case fails, with the cause
            message = f"{record.source_uris[0]}: {type(e).__name__}: {e}"
            code = ErrorCode.DECODE_ERROR
            rows.extend(slice_row(case_id, k, NO_IMAGE, 0.0, code, message) for k in range(k0, k0 + n))
            continue
        seconds = (time.perf_counter() - start) / max(n, 1)
        rows.extend(slice_row(case_id, k0 + i, image, seconds) for i, image in enumerate(images))
    return columns(rows)
