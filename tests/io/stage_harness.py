"""The job's scan and load stages, run in this process on a folder of files (no Ray): the exact batch
functions Ray Data calls (probe_block -> CaseGrouper -> plan_units -> load_units), so a property test
can feed them thousands of mutated inputs in seconds and check what no input may ever do:

- an exception escaping a stage (one bad file would fail a block, or the whole job);
- an object that ends in no case row, or in two;
- an ok row with a non-finite or degenerate affine or spacing;
- an `internal_error` row (a bug, not the input's fault);
- a slice row that is neither an image (uint8 [H, W, 3]) nor an error.

`findings(...)` returns one short signature per violation (the stage, the exception type and the
line of mcs_batch it came from), so that a survey can count distinct crashes.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mcs_batch.archive.grouping import CaseGrouper
from mcs_batch.archive.listing import WAVE_SCHEMA
from mcs_batch.archive.probe import probe_block
from mcs_batch.config import JobConfig
from mcs_batch.errors import ErrorCode
from mcs_batch.records import CaseRecord, Status
from mcs_batch.rows import CASE_ROW
from mcs_batch.stages.load import load_units, plan_units

UNIT_ROWS = 4  # load units much smaller than the job's: series cut into several, each decoded on its own


def _where(e: BaseException) -> str:
    """The innermost frame of mcs_batch in the traceback (else the innermost frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/mcs_batch/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.name}" if f else "?"


@dataclass
class Outcome:
    keys: list[str]
    cases: list[CaseRecord] = field(default_factory=list)
    slice_rows: list[dict] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    units: list[list[tuple[str, int, int]]] = field(default_factory=list)  # (case_id, slice_index, n_slices)

    def findings(self) -> list[str]:
        out = list(self.crashes)
        if self.crashes:
            return out
        seen: dict[str, int] = {}
        for record in self.cases:
            for key in record.source_keys:
                seen[key] = seen.get(key, 0) + 1
            if record.error_code == ErrorCode.INTERNAL_ERROR:
                out.append(f"internal_error row: {(record.error_message or '')[:160]}")
            if record.status == Status.OK:
                out.extend(_geometry_findings(record))
        for key in self.keys:
            if seen.get(key, 0) != 1:
                out.append(f"object in {seen.get(key, 0)} case rows")
        for row in self.slice_rows:
            image, code = row["image"], row["error_code"]
            if code:
                if code == ErrorCode.INTERNAL_ERROR:
                    out.append(f"internal_error slice: {row['error_message'][:160]}")
                continue
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                    and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):  # fmt: skip
                out.append(f"slice row without a valid image ({getattr(image, 'shape', None)})")
        return out


def _geometry_findings(record: CaseRecord) -> list[str]:
    out = []
    if not record.shape or len(record.shape) != 3 or min(record.shape) < 1:
        out.append(f"ok row with shape {record.shape}")
    affine = np.asarray(record.affine or [math.nan] * 16, float).reshape(4, 4)
    spacing = np.asarray(record.spacing_mm or [math.nan] * 3, float)
    if not np.all(np.isfinite(affine)) or not np.all(np.isfinite(spacing)):
        out.append("ok row with a non-finite affine or spacing")
    elif np.any(spacing < 1e-6) or abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-3:
        out.append("ok row with a degenerate affine")
    if record.slice_index and any(k < 0 or (record.shape and k >= record.shape[2]) for k in record.slice_index):
        out.append("ok row with a slice index outside the volume")
    return out


def run_stages(folder: Path, cfg: JobConfig | None = None, *, load: bool = True, unit_rows: int = UNIT_ROWS) -> Outcome:
    """Every file under `folder` through probe -> grouper -> plan -> load, as the job runs them."""
    cfg = cfg or JobConfig()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    rows = [{"uri": p.resolve().as_uri(), "rel": f"{folder.name}/{p.relative_to(folder).as_posix()}",
             "size": p.stat().st_size, "version": "", "prefix_id": "fuzz", "payload": ""} for p in files]  # fmt: skip
    outcome = Outcome(keys=[r["rel"] for r in rows])
    table = pa.Table.from_pylist(rows, schema=WAVE_SCHEMA)
    table = table.append_column("wave", pa.array([0] * len(rows), pa.int64()))
    try:
        probed = probe_block(table, storage=None)
    except Exception as e:
        outcome.crashes.append(f"probe: {type(e).__name__} at {_where(e)}")
        return outcome
    try:
        grouper = CaseGrouper([len(rows)], index_uri=(folder.parent / f".index-{folder.name}").as_uri(), run_id="fuzz")
        cases = grouper(probed)
        outcome.cases = [CaseRecord.from_row(r) for r in cases.to_pylist()]
    except Exception as e:
        outcome.crashes.append(f"grouper: {type(e).__name__} at {_where(e)}")
        return outcome
    if not load:
        return outcome
    try:
        units = plan_units(cases, cfg=cfg, unit_rows=unit_rows)
    except Exception as e:
        outcome.crashes.append(f"plan: {type(e).__name__} at {_where(e)}")
        return outcome
    planned = pa.Table.from_struct_array(pc.list_flatten(units.column("unit"))).to_pydict()
    outcome.units = [[(r["case_id"], r["slice_index"], r["n_slices"]) for r in unit]
                     for unit in units.column("unit").to_pylist()]  # fmt: skip
    if not planned["case_id"]:
        return outcome
    try:
        for i in range(units.num_rows):  # a unit per block, as in the job's graph: a decoding task each
            for batch in load_units(units.slice(i, 1), cfg=cfg, storage=None):
                outcome.slice_rows.extend(_slice_rows(batch))
    except Exception as e:
        outcome.crashes.append(f"load: {type(e).__name__} at {_where(e)}")
        return outcome
    _check_counts(outcome, planned)
    return outcome


def _slice_rows(batch: dict) -> Iterable[dict]:
    for i, k in enumerate(batch["slice_index"]):
        if int(k) != CASE_ROW:
            yield {c: batch[c][i] for c in ("case_id", "slice_index", "image", "error_code", "error_message")}


def _check_counts(outcome: Outcome, planned: dict) -> None:
    """Each case gets exactly the slice rows its case row announced (the writer counts on it)."""
    expected = {str(c): int(n) for c, k, n in zip(planned["case_id"], planned["slice_index"], planned["n_slices"],
                                                  strict=True) if int(k) == CASE_ROW}  # fmt: skip
    got: dict[str, list[int]] = {}
    for row in outcome.slice_rows:
        got.setdefault(str(row["case_id"]), []).append(int(row["slice_index"]))
    for case_id, n in expected.items():
        if sorted(got.get(case_id, [])) != list(range(n)):
            outcome.crashes.append(f"load: case with {len(got.get(case_id, []))} slice rows, {n} announced")
