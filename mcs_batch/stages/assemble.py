"""Finished slices back into cases, in the cluster: staging parts, then masks and catalog rows.

    write_parts     (Ray Data task after SAM) the slice rows of a block, grouped by case, each group
                    written as one staging part OUT/staging/<run_id>/parts/<case_id>/<uuid>.parquet;
                    out: one small row per part (case id, slices, part URI, stage times) and the case
                    rows as they came (record JSON, slices to expect). A case wholly in the block (its
                    record and all its slices: a 2D image, a short series) is assembled right there
                    instead, and leaves in the block's `done` row.
    assemble_cases  (a Ray task per few finished cases, launched by the driver) reads a case's parts,
                    builds its masks in the source geometry, writes them (NIfTI, PNG for 2D images)
                    and returns its catalog rows: small per-case rows and an Arrow table of slice rows.

The driver only counts slices per case, launches assembly and commits what comes back: no mask, no
image and no per-slice Python work passes through it. Staging lies outside catalog/, so readers of the
catalog never see it; a run removes its parts as it assembles them.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import posixpath
import time
import uuid
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.faults import worker_crash_hook
from mcs_batch.io.storage import StorageOptions, filesystem_for, to_uri
from mcs_batch.outputs.assemble import assemble_target, base_case_row, failed_from_slices, status_of
from mcs_batch.outputs.catalog import ABSORBS, REPLACES, Catalog, stamp_attempts
from mcs_batch.outputs.dicom_seg import (
    SEG_KINDS,
    Algorithm,
    build_segmentation,
    read_source_headers,
    safe_reason,
    seg_bytes,
    seg_uids,
    voxels_without_source,
)
from mcs_batch.outputs.masks import nifti_bytes, png_bytes
from mcs_batch.outputs.schema import SLICES_SCHEMA, table_from_rows
from mcs_batch.records import CaseRecord, Status, instances_digest
from mcs_batch.rows import CASE_ROW, case_of, target_column

STAGE_TIMES = ("load_at", "saliency_at", "sam_at")  # wall-clock end of each stage, per slice row
_DROPPED = {"image", "case_json", "n_slices"}  # slice-row columns not kept in a part


def part_columns(n_targets: int) -> list[str]:
    per_target = [target_column(j, w) for j in range(n_targets) for w in ("prompts", "mask", "score", "pixels")]
    return ["case_id", "slice_index", "error_code", "error_message", "height", "width", "load_s", "saliency_s",
            "sam_s", *STAGE_TIMES, "clip_sha256", "sam_sha256", "models_tiny", *per_target]  # fmt: skip


def _sink_row(
    case_id: str, kind: str, n: int, case_json: str = "", part_uri: str = "", times=None, result: bytes = b""
) -> dict:
    times = times or {}
    row = {"case_id": case_id, "row_kind": kind, "n_slices": n, "case_json": case_json, "part_uri": part_uri,
           "result": result}  # fmt: skip
    for name in STAGE_TIMES:
        row[f"first_{name}"] = float(times.get(name, (0.0, 0.0))[0])
        row[f"last_{name}"] = float(times.get(name, (0.0, 0.0))[1])
    return row


def _times(batch: dict, rows: list[int]) -> dict[str, tuple[float, float]]:
    times = {}
    for name in STAGE_TIMES:
        values = [float(batch[name][i]) for i in rows if float(batch[name][i]) > 0]
        times[name] = (min(values), max(values)) if values else (0.0, 0.0)
    return times


def write_parts(
    batch: dict,
    *,
    staging_uri: str,
    storage: StorageOptions | None,
    n_targets: int,
    cfg: JobConfig | None = None,
    run_id: str = "",
) -> dict:
    """map_batches (numpy): slice rows -> one staging part per case of the block; case rows pass.

    With `cfg` (the job's), a case whose record and every slice are in this block (a 2D image, a
    short series) is assembled right here instead (assemble_cases, with no staging part written, read
    and removed, and no assembly task): its results leave as one `done` row per block, `result`
    holding what assemble_cases returns (pickled: the same objects a Ray task result carries)."""
    out: list[dict] = []
    by_case: dict[str, list[int]] = defaultdict(list)
    records: dict[str, int] = {}
    for i, (case_id, k) in enumerate(zip(batch["case_id"], batch["slice_index"], strict=True)):
        if int(k) == CASE_ROW:
            records[str(case_id)] = i
        else:
            by_case[str(case_id)].append(i)
    here = {
        case_id: i
        for case_id, i in records.items()
        if cfg is not None and 0 < int(batch["n_slices"][i]) == len(by_case.get(case_id, ()))
    }
    for case_id, i in records.items():
        if case_id not in here:
            out.append(_sink_row(case_id, "case", int(batch["n_slices"][i]), str(batch["case_json"][i])))
    done: list[dict] = []
    if by_case:
        fs, root = filesystem_for(staging_uri, storage)
        columns = part_columns(n_targets)
        for case_id, rows in by_case.items():
            table = pa.table({c: [_plain(batch[c][i]) for i in rows] for c in columns})
            if case_id in here:
                slices = {int(r["slice_index"]): r for r in table.to_pylist()}
                done.append({"case_json": str(batch["case_json"][here[case_id]]), "parts": [], "slices": slices})
                continue
            folder = posixpath.join(root, case_id)
            path = posixpath.join(folder, f"{uuid.uuid4().hex}.parquet")
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            fs.makedirs(folder, exist_ok=True)
            fs.pipe_file(path, sink.getvalue().to_pybytes())
            out.append(_sink_row(case_id, "part", len(rows), part_uri=to_uri(fs, path), times=_times(batch, rows)))
    if done:
        assert cfg is not None
        result = assemble_cases(done, cfg=cfg, storage=storage, run_id=run_id)
        rows = [i for case_id in here for i in by_case[case_id]]
        out.append(_sink_row("", "done", len(rows), times=_times(batch, rows), result=pickle.dumps(result)))
    if not out:
        return {}
    return {key: [r[key] for r in out] for key in out[0]}


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value


# -- assembly (a Ray task) ----------------------------------------------------------------------------


def _read_parts(uris: list[str], storage: StorageOptions | None) -> dict[int, dict]:
    """The slice rows of a case's staging parts; CaseError(unreadable) when storage fails to give one
    back (transient: the next run redoes the case)."""
    slices: dict[int, dict] = {}
    for uri in uris:
        fs, path = filesystem_for(uri, storage)
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except Exception as e:
            raise CaseError(f"{uri}: cannot read the staging part back ({type(e).__name__}: {e})"[:300],
                            code=ErrorCode.UNREADABLE) from e  # fmt: skip
        for row in table.to_pylist():
            slices[int(row["slice_index"])] = row
    return slices


def _remove_parts(uris: list[str], storage: StorageOptions | None) -> None:
    for uri in uris:
        fs, path = filesystem_for(uri, storage)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)


def assemble_isolated(
    case: dict, cfg: JobConfig, catalog: Catalog, run_id: str, storage: StorageOptions | None
) -> dict:
    """assemble_case, or, where it raises (a bug, a part that cannot be read back), the case's rows as
    failures naming the cause: one case never fails the task or the driver that assembles others."""
    try:
        return assemble_case(case, cfg, catalog, run_id, storage)
    except Exception as e:
        record = case_of(case)
        info = json.loads(case["case_json"])
        done = set(info.get("done_targets") or ())
        code = e.code if isinstance(e, CaseError) else ErrorCode.INTERNAL_ERROR
        message = e.message if isinstance(e, CaseError) else f"assembling {record.case_id}: {type(e).__name__}: {e}"
        rows = [{**base_case_row(record, j, cfg), "status": Status.FAILED, "error_code": code,
                 "error_message": message[:500], "run_id": run_id, "tiny_models": cfg.models.tiny}
                for j, target in enumerate(cfg.targets) if target.name not in done]  # fmt: skip
        _stamp(rows, info.get("redo") or {}, cfg)
        return {"case_id": record.case_id, "case_rows": rows, "slice_rows": [], "failed": True, "slices": 0,
                "ok_slices": 0, "stage_seconds": {s: 0.0 for s in ("load", "saliency", "sam")},
                "models": {"clip": [], "sam": []}}  # fmt: skip


def _stamp(case_rows: list[dict], redo: dict[str, dict], cfg: JobConfig) -> None:
    """Each row's attempts, history and retryable flag, `_replaces` (the committed row it replaces) and
    `_absorbs` (failure rows of its objects as cases of their own, which its commit deletes): from the
    grouper's judgement of the catalog (`redo`, outputs/catalog.CommittedPairs)."""
    for row in case_rows:
        old = redo.get(row["target"])
        previous = (int(old["attempts"]), list(old["history"])) if old else None
        stamp_attempts(row, previous, cfg.failure_budget.transient_attempts)
        row[REPLACES] = old["replaces"] if old else None
        row[ABSORBS] = json.dumps(old["absorbs"]) if old and old.get("absorbs") else None


def assemble_case(case: dict, cfg: JobConfig, catalog: Catalog, run_id: str, storage: StorageOptions | None) -> dict:
    """One finished case: masks written, its rows returned (see assemble_cases)."""
    info = json.loads(case["case_json"])
    record = case_of(case)
    done = set(info.get("done_targets") or ())
    slices = case.get("slices") or (_read_parts(case["parts"], storage) if case["parts"] else {})
    error = failed_from_slices(slices)
    status = status_of(record, error)
    tiny = cfg.models.tiny or any(bool(r.get("models_tiny")) for r in slices.values())  # the run's, failures too
    case_rows, slice_rows = [], []
    case_failed = status == Status.FAILED
    seg_sources = _SegSources(record, storage) if cfg.outputs.dicom_seg and record.kind in SEG_KINDS else None
    for j, target in enumerate(cfg.targets):
        if target.name in done:
            continue
        row = {**base_case_row(record, j, cfg), "status": status, "run_id": run_id, "tiny_models": tiny}
        if error:
            row["error_code"], row["error_message"] = error
        if status == Status.OK:
            try:
                slice_rows.extend(_write_masks(record, slices, j, row, cfg, catalog, tiny, seg_sources))
            except Exception as e:  # one unwritable target must not stop the job
                message = f"writing masks of {record.case_id}/{target.name}: {type(e).__name__}: {e}"
                row.update(status=Status.FAILED, error_code=ErrorCode.INTERNAL_ERROR, error_message=message)
                case_failed = True
        case_rows.append(row)
    _stamp(case_rows, info.get("redo") or {}, cfg)
    rows = list(slices.values())
    return {
        "case_id": record.case_id,
        "case_rows": case_rows,
        "slice_rows": slice_rows,
        "failed": case_failed,
        "slices": len(rows),
        "ok_slices": sum(1 for r in rows if not r["error_code"]),
        "stage_seconds": {s: float(sum(float(r[f"{s}_s"]) for r in rows)) for s in ("load", "saliency", "sam")},
        "models": {n: sorted({str(r[f"{n}_sha256"]) for r in rows if r.get(f"{n}_sha256")}) for n in ("clip", "sam")},
    }


def _write_masks(
    record: CaseRecord,
    slices: dict[int, dict],
    j: int,
    row: dict,
    cfg: JobConfig,
    catalog: Catalog,
    tiny: bool,
    seg_sources: _SegSources | None = None,
) -> list[dict]:
    """Masks of target j (NIfTI in the source geometry; PNG too for 2D; a DICOM SEG when asked), its
    row fields; slice rows."""
    target = cfg.targets[j]
    built = assemble_target(record, slices, j, cfg)
    affine = np.asarray(record.affine, float).reshape(4, 4)
    nifti_path, png_path = catalog.mask_paths(record.case_id, target.name)
    catalog.write_bytes(nifti_path, nifti_bytes(built.mask, affine, tiny=tiny), crash_point="mask_half_written")
    row["mask_uri"] = catalog.fs.unstrip_protocol(nifti_path)
    if record.shape[2] == 1 and cfg.outputs.png_masks_for_2d:
        catalog.write_bytes(png_path, png_bytes(built.mask[:, :, 0].T))
        row["mask_png_uri"] = catalog.fs.unstrip_protocol(png_path)
    any_slice = next(iter(slices.values()), {})
    row.update(built.case_row, clip_sha256=any_slice.get("clip_sha256"), sam_sha256=any_slice.get("sam_sha256"))
    if seg_sources is not None:
        _write_seg(built.mask, record, j, row, cfg, catalog, seg_sources, tiny)
    return built.slice_rows


class _SegSources:
    """A case's source headers, read once (on first use) for all its targets' SEGs."""

    def __init__(self, record: CaseRecord, storage: StorageOptions | None):
        self.record, self.storage = record, storage
        self.headers: list | None = None

    def get(self) -> list:
        if self.headers is None:
            self.headers = read_source_headers(self.record.source_uris, storage=self.storage)
        return self.headers


def _write_seg(
    mask: np.ndarray, record: CaseRecord, j: int, row: dict, cfg: JobConfig, catalog: Catalog, sources: _SegSources,
    tiny: bool,
) -> None:  # fmt: skip
    """The DICOM SEG of target j beside its NIfTI (seg_uri). A SEG that cannot be made leaves the mask
    and the row ok, with seg_uri null and a `dicom_seg:` warning naming why (no header values)."""
    target = cfg.targets[j]
    try:
        series_uid, sop_uid = seg_uids(record.case_id, target.name, config_hash=str(row["config_hash"]),
                                       instances=instances_digest(record))
        parameters = {"config_hash": row["config_hash"], "clip_sha256": row.get("clip_sha256") or "",
                      "sam_sha256": row.get("sam_sha256") or ""}  # fmt: skip
        seg = build_segmentation(
            mask, record, sources.get(), label=target.name, codes=target.dicom_seg,
            algorithm=Algorithm(parameters=parameters), series_uid=series_uid, sop_uid=sop_uid,
            instance_number=j + 1, tiny=tiny,
        )  # fmt: skip
        path = catalog.seg_path(record.case_id, target.name)
        catalog.write_bytes(path, seg_bytes(seg))
        row["seg_uri"] = catalog.fs.unstrip_protocol(path)
        lost = voxels_without_source(mask, record)
        if lost:
            row["warnings"] = [*row["warnings"], f"dicom_seg: {lost} mask voxels on slices no source image holds"]
    except Exception as e:  # the NIfTI mask stands; the SEG is an extra
        reason = safe_reason(e, sources.headers or ())
        row["warnings"] = [*row["warnings"], f"dicom_seg: not written ({reason})"]


def assemble_cases(cases: list[dict], *, cfg: JobConfig, storage: StorageOptions | None, run_id: str) -> dict:
    """Ray task: finished cases ({case_json, parts}, or with `slices` already at hand: write_parts)
    -> masks written, and for the driver to commit:
    per-case results (rows, counts, model digests) and one Arrow table of all their slice rows. The
    staging parts are removed once read (a crash before the commit redoes the case in the next run)."""
    catalog = Catalog(cfg.outputs.uri, storage=storage, owner=run_id)
    catalog.crash_hook = worker_crash_hook(cfg.testing)
    results, slice_rows = [], []
    started = time.time()
    for case in cases:
        result = assemble_isolated(case, cfg, catalog, run_id, storage)
        slice_rows.extend({**s, "run_id": run_id} for s in result.pop("slice_rows"))
        results.append(result)
        _remove_parts(case["parts"], storage)
    return {
        "cases": results,
        "slices": table_from_rows(slice_rows, SLICES_SCHEMA),
        "started_at": started,
        "finished_at": time.time(),
    }
