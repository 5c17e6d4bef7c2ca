"""CPU stages: plan each case into a case row plus chunks of slices, then decode chunks into images.

Pure functions on records and arrays, wrapped as Ray Data batch functions at the bottom. A volume
is decoded `slice_chunk` slices at a time, so no worker holds a whole long series. Row format:
mcs_batch.rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.faults import decoder_crash, storage_fault
from mcs_batch.io.display import slice_count, volume_in_display
from mcs_batch.io.limits import loaded_whole
from mcs_batch.io.load import load_case
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.io.window import to_model_rgb
from mcs_batch.records import CaseRecord, Status, slice_axis_for
from mcs_batch.rows import CASE_ROW, NO_IMAGE, case_of, case_row, chunk_row, columns, slice_row

LOAD_YIELD_ROWS = 16  # decoded slices handed on at a time (bounds a load task's memory)


def plan_case(record: CaseRecord, *, slice_chunk: int, axis: int, done_targets=(), redo=None) -> list[dict]:
    """One case row, then one chunk row per `slice_chunk` slices (none for cases that are not ok)."""
    n = slice_count(record, axis) if record.status == Status.OK else 0
    head = case_row(record, n, done_targets, redo)
    return [head] + [chunk_row(head, k0, min(k0 + slice_chunk, n) - k0) for k0 in range(0, n, slice_chunk)]


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


def _planned(table, cfg: JobConfig) -> Iterator[tuple[bool, list[dict]]]:
    """Per case row of the archive stream (manifest schema + done_targets, redo): whether its chunks may
    be decoded in different tasks (an axial DICOM series read file by file; not a volume decoded whole:
    each task would decode it again), and its case + chunk rows. Cases whose every target is committed
    never get here (the grouper drops them; it also applied the size limits). A case that cannot be
    planned fails on its own."""
    for row in table.to_pylist():
        record = CaseRecord.from_row(row)
        done = [str(t) for t in (row.get("done_targets") or [])]
        redo = json.loads(row["redo"]) if row.get("redo") else None
        try:
            planned = plan_case(record, slice_chunk=cfg.resources.slice_chunk, axis=cfg.slice_axis,
                                done_targets=done, redo=redo)  # fmt: skip
            apart = not loaded_whole(record, slice_axis_for(record, cfg.slice_axis))
        except Exception as e:  # a record no plan can be made of: its case fails, the block goes on
            record.status, record.error_code = Status.FAILED, ErrorCode.INTERNAL_ERROR
            record.error_message = f"{record.case_id}: cannot plan the case ({type(e).__name__}: {e})"[:300]
            planned, apart = plan_case(record, slice_chunk=1, axis=cfg.slice_axis, done_targets=done, redo=redo), False
        yield apart, planned


UNIT_TYPE = pa.list_(pa.struct([("case_id", pa.string()), ("slice_index", pa.int64()), ("n_slices", pa.int64()),
                                  ("case_json", pa.string())]))  # fmt: skip


def plan_units(table, *, cfg: JobConfig, unit_rows: int) -> pa.Table:
    """map_batches (pyarrow in): a block of case rows (a scan wave's cases, from the grouper) -> load
    units, one row each (`unit`: case and chunk rows) that decode into at most `unit_rows` rows (a
    case row and its slices): 2D images together, a long DICOM series cut at chunk boundaries, a volume
    decoded whole in a unit of its own, a case row with its first chunk. The graph puts each unit in a
    block of its own, so a wave is decoded by as many tasks as it has units, not by one task (Ray Data
    runs one task per block), and each decoding task hands on about one block."""
    units: list[list[dict]] = []
    unit: list[dict] = []
    weight = 0
    for apart, (head, *chunks) in _planned(table, cfg):
        sizes = [int(c["n_slices"]) for c in chunks]
        if apart and chunks:  # the case row with its first chunk, then chunk by chunk
            pieces = [([head, chunks[0]], 1 + sizes[0])]
            pieces += [([c], n) for c, n in zip(chunks[1:], sizes[1:], strict=True)]
        else:
            pieces = [([head, *chunks], 1 + sum(sizes))]
        for rows, n in pieces:
            if unit and weight + n > unit_rows:
                units.append(unit)
                unit, weight = [], 0
            unit += rows
            weight += n
    if unit:
        units.append(unit)
    return pa.table({"unit": pa.array(units, type=UNIT_TYPE)})


def load_units(table, *, cfg: JobConfig, storage: StorageOptions | None):
    """map_batches generator (pyarrow in): load units (plan_units) -> slice rows, as load_batch."""
    rows = pc.list_flatten(table.column("unit")).combine_chunks()
    if not len(rows):
        return
    batch = {name: rows.field(name).to_pylist() for name in ("case_id", "slice_index", "n_slices", "case_json")}
    yield from load_batch(batch, cfg=cfg, storage=storage)


class DecodeJournal:
    """Which chunk this node's load tasks are decoding, in a node-local folder: a chunk whose decoding
    kills its worker process (a native decoder's abort or segfault, or the memory monitor: nothing
    Python can catch) fails on its own after MAX_DEATHS deaths, instead of Ray Data retrying its task
    without end (it retries tasks whose worker died, max_retries -1) and the job never finishing.

    An entry holds how many attempts started; a decode that returns (or raises) removes it, so an
    entry found at the start of an attempt counts attempts that died. Entries are keyed by OUT, case and
    first slice, so a later run remembers them too."""

    MAX_DEATHS = 2

    def __init__(self, out: str, folder: str | None = None):
        import tempfile

        self.out = out
        self.folder = folder or os.path.join(tempfile.gettempdir(), "mcs-batch-decoding")

    def _path(self, case_id: str, k0: int) -> str:
        key = hashlib.sha256(f"{self.out}|{case_id}|{k0}".encode()).hexdigest()[:32]
        return os.path.join(self.folder, key)

    def begin(self, case_id: str, k0: int) -> int:
        """Attempts of this chunk that died so far; records this one."""
        path = self._path(case_id, k0)
        try:
            with open(path) as f:
                deaths = int(f.read() or 0)
        except (OSError, ValueError):
            deaths = 0
        if deaths < self.MAX_DEATHS:
            with contextlib.suppress(OSError):  # a node without a writable temp folder decodes unguarded
                os.makedirs(self.folder, exist_ok=True)
                with open(path, "w") as f:
                    f.write(str(deaths + 1))
        return deaths

    def end(self, case_id: str, k0: int) -> None:
        with contextlib.suppress(OSError):
            os.remove(self._path(case_id, k0))


def load_batch(batch: dict, *, cfg: JobConfig, storage: StorageOptions | None):
    """map_batches generator: chunk rows -> slice rows (images), one output per chunk (so that Ray
    Data can cut a long series into several blocks: memory stays bounded); case rows pass through.
    Never raises for a case: a chunk that cannot be decoded becomes error rows (one per slice, so the
    writer's count holds), and so does a chunk whose decoding killed the worker twice (DecodeJournal)."""
    passing: list[dict] = []
    cache: dict = {}  # the whole volume of the case in progress, where it cannot be read by chunks
    journal = DecodeJournal(cfg.outputs.uri)
    for case_id, k0, n, case_json in zip(
        batch["case_id"], batch["slice_index"], batch["n_slices"], batch["case_json"], strict=True
    ):
        k0, n = int(k0), int(n)
        if k0 == CASE_ROW:
            passing.append({**slice_row(case_id, CASE_ROW, NO_IMAGE, 0.0), "n_slices": n, "case_json": case_json})
            continue
        record = case_of({"case_json": case_json})
        start = time.perf_counter()
        deaths = journal.begin(str(case_id), k0)
        try:
            if deaths >= journal.MAX_DEATHS:
                raise CaseError(f"{record.source_uris[0]}: the worker process died {deaths} times while decoding "
                                f"slices {k0}..{k0 + n - 1} (a decoder crash, or more memory than the node has)",
                                code=ErrorCode.DECODE_ERROR)  # fmt: skip
            if storage_fault(cfg.testing, record.source_keys):
                raise CaseError(f"{record.source_uris[0]}: cannot read object (injected storage fault)",
                                code=ErrorCode.UNREADABLE)  # fmt: skip
            decoder_crash(cfg.testing, record.source_keys)
            fs = filesystem_for(record.source_uris[0], storage)[0]
            images = load_chunk(record, k0, k0 + n, cfg, fs=fs, cache=cache)
            if len(images) != n:
                raise CaseError(f"{record.source_uris[0]}: {len(images)} slices decoded of {n} expected",
                                code=ErrorCode.DECODE_ERROR)  # fmt: skip
        except CaseError as e:
            passing.extend(slice_row(case_id, k, NO_IMAGE, 0.0, e.code, e.message) for k in range(k0, k0 + n))
            continue
        except Exception as e:  # a decoder bug must not kill the job: this case fails, with the cause
            message = f"{record.source_uris[0]}: {type(e).__name__}: {e}"[:500]
            code = ErrorCode.DECODE_ERROR
            passing.extend(slice_row(case_id, k, NO_IMAGE, 0.0, code, message) for k in range(k0, k0 + n))
            continue
        finally:
            journal.end(str(case_id), k0)
        seconds = (time.perf_counter() - start) / max(n, 1)
        passing.extend(slice_row(case_id, k0 + i, image, seconds) for i, image in enumerate(images))
        if len(passing) >= LOAD_YIELD_ROWS:
            yield columns(passing)
            passing = []
    if passing:
        yield columns(passing)
