"""CPU stages: plan each case into a case row plus chunks of slices, then decode chunks into images.

Pure functions on records and arrays, wrapped as Ray Data batch functions at the bottom. A volume
is decoded `slice_chunk` slices at a time, so no worker holds a whole long series. Row format:
mcs_batch.rows.
"""

from __future__ import annotations

import json
import time

import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.faults import storage_fault
from mcs_batch.io.display import display_shape, reoriented, slice_count, volume_in_display
from mcs_batch.io.load import load_case
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.io.window import to_model_rgb
from mcs_batch.records import CaseKind, CaseRecord, Status, slice_axis_for
from mcs_batch.rows import CASE_ROW, NO_IMAGE, case_of, case_row, chunk_row, columns, slice_row

LOAD_YIELD_ROWS = 16  # decoded slices handed on at a time (bounds a load task's memory)


def plan_case(record: CaseRecord, *, slice_chunk: int, axis: int, done_targets=(), supersede=None) -> list[dict]:
    """One case row, then one chunk row per `slice_chunk` slices (none for cases that are not ok)."""
    n = slice_count(record, axis) if record.status == Status.OK else 0
    head = case_row(record, n, done_targets, supersede)
    return [head] + [chunk_row(head, k0, min(k0 + slice_chunk, n) - k0) for k0 in range(0, n, slice_chunk)]


def check_size(record: CaseRecord, cfg: JobConfig) -> CaseRecord:
    """A case too large for the configured limits fails here, before any pixel is decoded: a slice
    past resources.max_image_pixels, or a volume loaded whole (slice_axis other than 2) past
    resources.max_volume_voxels. Not an actor that runs out of memory and is retried forever."""
    if record.status != Status.OK or record.shape is None:
        return record
    axis = slice_axis_for(record, cfg.slice_axis)
    shape = display_shape(record)
    in_plane = int(np.prod([shape[a] for a in range(3) if a != axis]))
    limits = cfg.resources
    message = None
    if in_plane > limits.max_image_pixels:
        message = f"slices of {in_plane:,} pixels exceed resources.max_image_pixels ({limits.max_image_pixels:,})"
    elif loaded_whole(record, axis) and int(np.prod(shape)) > limits.max_volume_voxels:
        why = ("a NIfTI file" if record.kind == CaseKind.NIFTI else f"slice_axis {axis}" if axis != 2
               else "shown in another orientation than stored")  # fmt: skip
        message = (f"a volume of {int(np.prod(shape)):,} voxels, loaded whole ({why}), exceeds "
                   f"resources.max_volume_voxels ({limits.max_volume_voxels:,})")  # fmt: skip
    if message is None:
        return record
    record.status, record.error_code = Status.FAILED, ErrorCode.TOO_LARGE
    record.error_message = f"{record.source_uris[0] if record.source_uris else record.case_id}: {message}"
    return record


def loaded_whole(record: CaseRecord, axis: int) -> bool:
    """A NIfTI file (a gzip stream), a volume sliced along another axis than its files, or one shown
    in another orientation than stored is decoded whole; an axial DICOM series chunk by chunk."""
    return axis != 2 or record.kind == CaseKind.NIFTI or reoriented(record)


def load_chunk(
    record: CaseRecord, k0: int, k1: int, cfg: JobConfig, *, fs, cache: dict | None = None
) -> list[np.ndarray]:
    """Slices k0..k1-1 along the case's slice axis as model input: uint8 RGB [H, W, 3] each
    (windowed for the modality, or 8-bit values as stored). The job, `explain` and weak
    supervision all read slices through this.

    A DICOM series is read file by file, chunk by chunk. A NIfTI file (a gzip stream: no random
    access) or a volume sliced along another axis is decoded whole once, put in the display
    orientation (io/display.py) and kept in `cache` (one case) for the chunks that follow, instead of
    being fetched and decompressed again for every chunk.
    """
    axis = slice_axis_for(record, cfg.slice_axis)
    if not loaded_whole(record, axis):
        volume = load_case(record, fs=fs, slices=slice(k0, k1))
        planes = [volume.slice_image(k - k0) for k in range(k0, k1)]
    else:
        volume = cache.get(record.case_id) if cache is not None else None
        if volume is None:
            volume = volume_in_display(load_case(record, fs=fs), record)
            if cache is not None:
                cache.clear()
                cache[record.case_id] = volume
        planes = [volume.slice_image(k, axis=axis) for k in range(k0, k1)]
    as_stored = bool(volume.meta.get("as_stored"))
    return [to_model_rgb(p, modality=record.modality, settings=cfg.window, as_stored=as_stored) for p in planes]


# -- Ray Data wrappers ------------------------------------------------------------------------------


def plan_batch(table, *, cfg: JobConfig) -> dict:
    """map_batches (pyarrow in): case rows of the archive stream (manifest schema + done_targets,
    supersede) -> case rows + chunk rows. Cases whose every target is committed never get here (the
    grouper drops them). A map_batches, not a flat_map, so that Ray Data fuses it with the repartition
    after it."""
    rows: list[dict] = []
    for row in table.to_pylist():
        record = check_size(CaseRecord.from_row(row), cfg)
        done = [str(t) for t in (row.get("done_targets") or [])]
        supersede = json.loads(row["supersede"]) if row.get("supersede") else None
        rows += plan_case(record, slice_chunk=cfg.resources.slice_chunk, axis=cfg.slice_axis, done_targets=done,
                          supersede=supersede)  # fmt: skip
    return columns(rows)


def load_batch(batch: dict, *, cfg: JobConfig, storage: StorageOptions | None):
    """map_batches generator: chunk rows -> slice rows (images), one output per chunk (so that Ray
    Data can cut a long series into several blocks: memory stays bounded); case rows pass through.
    Never raises for a case: a chunk that cannot be decoded becomes error rows (one per slice, so the
    writer's count holds)."""
    passing: list[dict] = []
    cache: dict = {}  # the whole volume of the case in progress, where it cannot be read by chunks
    for case_id, k0, n, case_json in zip(
        batch["case_id"], batch["slice_index"], batch["n_slices"], batch["case_json"], strict=True
    ):
        k0, n = int(k0), int(n)
        if k0 == CASE_ROW:
            passing.append({**slice_row(case_id, CASE_ROW, NO_IMAGE, 0.0), "n_slices": n, "case_json": case_json})
            continue
        record = case_of({"case_json": case_json})
        start = time.perf_counter()
        try:
            if storage_fault(cfg.testing, record.source_keys):
                raise CaseError(f"{record.source_uris[0]}: cannot read object (injected storage fault)",
                                code=ErrorCode.UNREADABLE)  # fmt: skip
            fs = filesystem_for(record.source_uris[0], storage)[0]
            images = load_chunk(record, k0, k0 + n, cfg, fs=fs, cache=cache)
        except CaseError as e:
            passing.extend(slice_row(case_id, k, NO_IMAGE, 0.0, e.code, e.message) for k in range(k0, k0 + n))
            continue
        except Exception as e:  # a decoder bug must not kill the job: this case fails, with the cause
            message = f"{record.source_uris[0]}: {type(e).__name__}: {e}"
            code = ErrorCode.DECODE_ERROR
            passing.extend(slice_row(case_id, k, NO_IMAGE, 0.0, code, message) for k in range(k0, k0 + n))
            continue
        seconds = (time.perf_counter() - start) / max(n, 1)
        passing.extend(slice_row(case_id, k0 + i, image, seconds) for i, image in enumerate(images))
        if len(passing) >= LOAD_YIELD_ROWS:
            yield columns(passing)
            passing = []
    if passing:
        yield columns(passing)
