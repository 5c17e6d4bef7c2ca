"""`refine`: the checkpoint ensemble over a segmentation run's cases -> target "<target>@weak" in its OUT.

    summary = refine(cfg, storage=storage)   # cfg.source = OUT, cfg.target, cfg.work (the ensemble)

A Ray Data actor pool (`RefineActor`, the ensemble loaded once per actor) reads each case's planes as the
job did (stages.load.load_chunk, the job's window and slice axis), averages the members' foreground
probabilities (a running mean per slice, the members loaded one at a time: memory does not grow with
their count, see ensemble.py), thresholds them (refine.threshold, 0.2), places the slices in the job's
display grid (io/display.py) and writes the refined mask back in the zero-shot mask's geometry (NIfTI with the
source affine, PNG too for 2D images) at OUT/masks/<case>/<target>@weak. A 3d_fullres ensemble predicts
each volume whole instead (the source's values in physical units, in the display orientation, as
export3d exported them) and the per-slice scores are taken from the volume's moments. DICOM cases of
a run whose job wrote DICOM SEG (outputs.dicom_seg) get one for the refined mask too
(OUT/masks/<case>/<target>@weak.seg.dcm); a SEG that cannot be made leaves the mask and a warning.
The driver commits the rows through Catalog.commit: a cases row per case (the zero-shot row's
identity and geometry, the refined mask's statistics) and a slices row per slice. Zero-shot rows and
masks are never touched; refined pairs already committed are skipped, so a second run finishes an
interrupted one.

Per-case uncertainty (uncertainty.case_uncertainty): `uncertainty` (entropy of the mean probability
per boundary pixel) and `uncertainty_spread` (std across members). The catalog's cases schema has no
column for them yet: they are in the rows handed to commit (kept once the schema gains the columns),
in OUT/runs/<run_id>.json and in WORK/refine/<run_id>.parquet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage

from mcs_batch.config import JobConfig, SegmentCodes
from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.display import display_shape, slice_count, to_display, to_stored, volume_in_display
from mcs_batch.io.load import load_case
from mcs_batch.io.storage import StorageOptions, filesystem_for, join
from mcs_batch.io.volume import place, plane
from mcs_batch.outputs.assemble import mask_volume_ml
from mcs_batch.outputs.catalog import REPLACES, Catalog, new_run_id
from mcs_batch.outputs.dicom_seg import (
    SEG_KINDS,
    Algorithm,
    build_segmentation,
    read_source_headers,
    safe_reason,
    seg_bytes,
    seg_uids,
)
from mcs_batch.outputs.lease import RunHeartbeat
from mcs_batch.outputs.masks import nifti_bytes, png_bytes
from mcs_batch.outputs.reader import job_config_of_run, read_mask, record_of
from mcs_batch.records import slice_axis_for
from mcs_batch.stages.load import load_chunk
from mcs_batch.train.weak.config import SLICES_LABELLED, WeakConfig, ensemble_slices
from mcs_batch.train.weak.ensemble import read_ensemble
from mcs_batch.train.weak.export3d import is_volume
from mcs_batch.train.weak.files import write_bytes
from mcs_batch.train.weak.resources import resolve_weak_resources, weak_cluster_view
from mcs_batch.train.weak.uncertainty import SliceScores, case_uncertainty, score_mean_std, score_moments

SLICES_PER_READ = 16
REFINED_FIELDS = ("mask_uri", "mask_png_uri", "mask_voxels", "mask_volume_ml", "n_components", "n_slices",
                  "n_slices_with_mask", "uncertainty", "uncertainty_spread")  # fmt: skip
ZERO_SHOT_ONLY = ("n_slices_empty_saliency", "sam_score_mean", "saliency_mean", "saliency_max", "clip_sha256",
                  "sam_sha256", "load_seconds", "saliency_seconds", "sam_seconds", "error_code",
                  "error_message", "seg_uri")  # fmt: skip


def refine_case(row: dict, predictor, *, cfg: WeakConfig, catalog: Catalog, run_id: str, storage) -> dict:
    """One zero-shot case row -> its refined case row (mask written, and a DICOM SEG when the job
    wrote them) and slice rows."""
    record = record_of(row)
    job = job_config_of_run(catalog, row.get("run_id"))
    axis = slice_axis_for(record, job.slice_axis)
    mask = np.zeros(display_shape(record), np.uint8)  # the job's display grid (io/display.py)
    fs = filesystem_for(record.source_uris[0], storage)[0]
    scores, predicted = [], []
    wanted = _wanted_slices(row, record, predictor, cfg, axis, storage)
    for k, scored in _slice_scores(record, row, predictor, job, axis, fs, cfg.refine.threshold, wanted):
        place(mask, k, axis, scored.mask.astype(np.uint8))
        scores.append(scored)
        if wanted is None or k in wanted:
            predicted.append(scored)
    slice_rows = [{"case_id": record.case_id, "target": cfg.refined_target, "slice_index": k,
                   "mask_pixels": int(s.mask.sum()), "run_id": run_id} for k, s in enumerate(scores)]  # fmt: skip
    mask = np.ascontiguousarray(to_stored(mask, record))
    affine = np.asarray(record.affine, float).reshape(4, 4)
    nifti_path, png_path = catalog.mask_paths(record.case_id, cfg.refined_target)
    tiny = bool(row.get("tiny_models"))
    catalog.write_bytes(nifti_path, nifti_bytes(mask, affine, tiny=tiny))
    out = {k: v for k, v in row.items() if k not in ZERO_SHOT_ONLY and k != "dataset"}
    out.update(target=cfg.refined_target, run_id=run_id, config_hash=cfg.hash(), status="ok",
               mask_uri=catalog.fs.unstrip_protocol(nifti_path), mask_png_uri=None, seg_uri=None,
               warnings=[w for w in row.get("warnings") or [] if not w.startswith("dicom_seg:")])  # fmt: skip
    if mask.shape[2] == 1:
        catalog.write_bytes(png_path, png_bytes(mask[:, :, 0].T))
        out["mask_png_uri"] = catalog.fs.unstrip_protocol(png_path)
    if job.outputs.dicom_seg and record.kind in SEG_KINDS:
        _write_seg(mask, record, out, cfg, job, catalog, run_id, storage, predictor, tiny)
    voxels = int(mask.sum())
    out.update(
        mask_voxels=voxels,
        mask_volume_ml=mask_volume_ml(record, voxels),
        n_components=int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1]) if voxels else 0,
        n_slices=len(scores),
        n_slices_with_mask=sum(1 for s in scores if s.mask.any()),
        **case_uncertainty(predicted),
    )
    return {"case_row": out, "slice_rows": slice_rows}


def _wanted_slices(row: dict, record, predictor, cfg: WeakConfig, axis: int, storage) -> set[int] | None:
    """The slices of a volume a 2d ensemble predicts under the training's slice policy
    (config.ensemble_slices): None for every slice; with "labelled", the slices whose zero-shot mask
    has at least the training's select.min_mask_pixels (the others stay empty, as the model was never
    shown an empty slice). 2D images are always predicted (the paper's path: an image whose zero-shot
    mask is empty is one refinement can rescue)."""
    document = getattr(predictor, "document", {})
    if getattr(predictor, "three_d", False) or not is_volume(row):
        return None
    if ensemble_slices(cfg.refine.slices, document) != SLICES_LABELLED:
        return None
    min_pixels = int(((document.get("config") or {}).get("select") or {}).get("min_mask_pixels") or 1)
    return labelled_slices(to_display(read_mask(row["mask_uri"], storage), record), axis, min_pixels)


def labelled_slices(mask: np.ndarray, axis: int, min_pixels: int = 1) -> set[int]:
    """Slice indices along `axis` of a display-grid mask [I, J, K] with at least `min_pixels` pixels."""
    other = tuple(a for a in range(3) if a != axis)
    counts = np.count_nonzero(np.asarray(mask) > 0, axis=other)
    return {int(k) for k in np.flatnonzero(counts >= min_pixels)}


def _empty_scores(shape_hw: tuple[int, int]) -> SliceScores:
    """A slice left out of prediction: empty mask, no uncertainty."""
    return SliceScores(mask=np.zeros(shape_hw, bool), mean_probability=np.zeros(shape_hw, np.float32),
                       entropy_sum=0.0, boundary_pixels=0, spread=0.0)  # fmt: skip


def _slice_scores(record, row: dict, predictor, job: JobConfig, axis: int, fs, threshold: float,
                  wanted: set[int] | None = None):  # fmt: skip
    """(slice index, SliceScores) for every slice along `axis` of the display grid. 2d: the job's
    planes (load_chunk), SLICES_PER_READ at a time, predicted where `wanted` (None: all) and empty
    elsewhere; 3d_fullres: the whole volume in physical units (io/ loaders, display orientation), its
    members' moments sliced afterwards."""
    n = slice_count(record, job.slice_axis)
    if getattr(predictor, "three_d", False):
        if not is_volume(row):
            raise CaseError(f"case {record.case_id}: a 3d_fullres ensemble refines volumes, this case has "
                            f"shape {record.shape}", code=ErrorCode.UNSUPPORTED_DIMENSIONS)  # fmt: skip
        volume = volume_in_display(load_case(record, fs=fs), record)
        moments = predictor.volume_moments(volume.array, volume.spacing_mm)
        mean, std = moments.mean, moments.std
        for k in range(n):
            yield k, score_mean_std(plane(mean, k, axis), plane(std, k, axis), threshold)
        return
    cache: dict = {}
    for k0 in range(0, n, SLICES_PER_READ):
        k1 = min(k0 + SLICES_PER_READ, n)
        ks = [k for k in range(k0, k1) if wanted is None or k in wanted]
        images = list(load_chunk(record, k0, k1, job, fs=fs, cache=cache)) if ks else []
        moments = dict(zip(ks, predictor.moments([images[k - k0] for k in ks]), strict=True))
        for k in range(k0, k1):
            if k in moments:
                yield k, score_moments(moments[k], threshold)
            else:
                yield k, _empty_scores(_plane_shape(record, axis))


def _plane_shape(record, axis: int) -> tuple[int, int]:
    """[H, W] of a slice along `axis` of the display grid (volume.plane: the two other axes swapped)."""
    shape = display_shape(record)
    w, h = (shape[a] for a in range(3) if a != axis)
    return h, w


def _write_seg(mask: np.ndarray, record, out: dict, cfg: WeakConfig, job: JobConfig, catalog: Catalog, run_id: str,
               storage, predictor, tiny: bool) -> None:  # fmt: skip
    """The refined mask's DICOM SEG beside its NIfTI (seg_uri), its segment coded as the job coded the
    zero-shot target's. A SEG that cannot be made leaves the mask and the row ok, with seg_uri null
    and a `dicom_seg:` warning naming why (no header values)."""
    sources: list = []
    try:
        codes = next((t.dicom_seg for t in job.targets if t.name == cfg.target), SegmentCodes())
        sources = read_source_headers(record.source_uris, storage=storage)
        series_uid, sop_uid = seg_uids(run_id, record.case_id, cfg.refined_target)
        document = getattr(predictor, "document", {})
        parameters = {"config_hash": cfg.hash(), "ensemble": str(document.get("identity") or ""),
                      "configuration": str(document.get("configuration") or "")}  # fmt: skip
        seg = build_segmentation(mask, record, sources, label=cfg.refined_target, codes=codes,
                                 algorithm=Algorithm(name="mcs-batch nnU-Net ensemble", parameters=parameters),
                                 series_uid=series_uid, sop_uid=sop_uid, tiny=tiny)  # fmt: skip
        path = catalog.seg_path(record.case_id, cfg.refined_target)
        catalog.write_bytes(path, seg_bytes(seg))
        out["seg_uri"] = catalog.fs.unstrip_protocol(path)
    except Exception as e:  # the NIfTI mask stands; the SEG is an extra
        out["warnings"] = [*out["warnings"], f"dicom_seg: not written ({safe_reason(e, sources)})"]


class RefineActor:
    """Ray Data actor: loads the ensemble once; batches of case rows (JSON) -> refined rows (JSON)."""

    def __init__(self, cfg: WeakConfig, storage: StorageOptions | None, run_id: str, device: str = "cpu"):
        from mcs_batch.train.weak.ensemble import EnsemblePredictor

        self.predictor = EnsemblePredictor(cfg.work, storage=storage, max_members=cfg.refine.max_checkpoints,
                                           device=device, scratch_dir=cfg.run.scratch_dir)  # fmt: skip
        self.cfg, self.storage, self.run_id = cfg, storage, run_id
        self.catalog = Catalog(cfg.source, storage=storage)

    def __call__(self, batch: dict) -> dict:
        results = []
        for text in batch["case_json"]:
            row = json.loads(str(text))
            started = time.perf_counter()
            try:
                result = refine_case(row, self.predictor, cfg=self.cfg, catalog=self.catalog, run_id=self.run_id,
                                     storage=self.storage)  # fmt: skip
            except CaseError as e:
                result = _failed(row, self.cfg, self.run_id, e.code, e.message)
            except Exception as e:  # one broken case must not stop the pool
                result = _failed(row, self.cfg, self.run_id, ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}")
            result["seconds"] = time.perf_counter() - started
            results.append(json.dumps(result, default=_plain))
        return {"result": np.asarray(results, dtype=object)}


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _failed(row: dict, cfg: WeakConfig, run_id: str, code, message: str) -> dict:
    out = {k: v for k, v in row.items() if k not in ZERO_SHOT_ONLY and k not in REFINED_FIELDS and k != "dataset"}
    out.update(target=cfg.refined_target, status="failed", error_code=str(code), error_message=message,
               run_id=run_id, config_hash=cfg.hash())  # fmt: skip
    return {"case_row": out, "slice_rows": []}


def cases_to_refine(catalog: Catalog, cfg: WeakConfig, case_ids: list[str] | None = None) -> list[dict]:
    """The zero-shot rows of the target (status ok) whose refined pair is not committed ok yet; a row
    whose refined pair failed before names that row's run (`_replaces`): its new row replaces it."""
    refined = catalog.cases(["case_id", "target", "status", "run_id"]).to_pylist()
    done = {r["case_id"] for r in refined if r["target"] == cfg.refined_target and r["status"] == "ok"}
    failed = {r["case_id"]: r["run_id"] for r in refined if r["target"] == cfg.refined_target and r["status"] != "ok"}
    rows = [r for r in catalog.cases().to_pylist() if r["target"] == cfg.target and r["status"] == "ok"]
    wanted = set(case_ids) if case_ids else None
    return [{**r, REPLACES: failed.get(r["case_id"])} for r in rows
            if r["case_id"] not in done and (wanted is None or r["case_id"] in wanted)]  # fmt: skip


def refine(cfg: WeakConfig, *, storage: StorageOptions | None = None, case_ids: list[str] | None = None,
           progress: Callable[[str], None] = print, commit_every: int = 16) -> dict:  # fmt: skip
    """Refine the cases of cfg.target in cfg.source with the ensemble in cfg.work; returns the summary.
    Commits beside any segment job writing cfg.source (the catalog takes concurrent writers)."""
    cfg.check_required()
    ensemble = read_ensemble(cfg.work, storage)  # ConfigError before any work when there is none
    run_id = new_run_id("refine")
    catalog = Catalog(cfg.source, storage=storage, owner=run_id)
    catalog.check_writable()
    heartbeat = RunHeartbeat(catalog, run_id)
    heartbeat.start()
    try:
        return _refine(cfg, catalog, run_id, ensemble, storage=storage, case_ids=case_ids,
                       progress=progress, commit_every=commit_every)  # fmt: skip
    finally:
        catalog.remove_staging(run_id)
        heartbeat.stop()


def _refine(cfg: WeakConfig, catalog: Catalog, run_id: str, ensemble: dict, *, storage, case_ids, progress,
                   commit_every: int) -> dict:  # fmt: skip
    import ray

    rows = cases_to_refine(catalog, cfg, case_ids)
    started = time.time()
    resources = resolve_weak_resources(cfg, weak_cluster_view())
    slices = "whole volumes" if ensemble.get("configuration") == "3d_fullres" else (
        f"{ensemble_slices(cfg.refine.slices, ensemble)} slices")  # fmt: skip
    progress(f"refining {len(rows)} case(s) of {cfg.target} with {len(ensemble['members'])} checkpoint(s) "
             f"-> {cfg.refined_target} ({slices}; {resources.refine_actors} actor(s), "
             f"{resources.refine_device})")  # fmt: skip
    counts = {"ok": 0, "failed": 0}
    uncertainty_rows: list[dict] = []
    versions: dict[str, dict[str, int]] = {}  # table -> the first and last version this run committed
    if rows:
        items = [{"case_json": json.dumps(r, default=str)} for r in rows]
        data = ray.data.from_items(items).map_batches(
            RefineActor,
            fn_constructor_kwargs={"cfg": cfg, "storage": storage, "run_id": run_id, "device": resources.refine_device},
            compute=ray.data.ActorPoolStrategy(size=resources.refine_actors),
            num_cpus=cfg.refine.cpus_per_actor,
            num_gpus=resources.refine_gpus_per_actor,
            batch_size=cfg.refine.batch_cases,
            batch_format="numpy",
        )
        pending_cases, pending_slices, seq = [], [], 0
        replaces = {r["case_id"]: r[REPLACES] for r in rows}

        def commit() -> None:
            result = catalog.commit(run_id, seq, pending_cases, pending_slices)
            for table, version in (result.versions or {}).items():
                versions.setdefault(table, {"first": version})["last"] = version

        for item in data.iter_rows():
            result = json.loads(str(item["result"]))
            case_row = result["case_row"]
            case_row["committed_at"] = datetime.now(UTC).isoformat()
            case_row[REPLACES] = replaces.get(case_row["case_id"])
            counts[case_row["status"]] = counts.get(case_row["status"], 0) + 1
            uncertainty_rows.append({k: case_row.get(k) for k in ("case_id", "status", "uncertainty",
                                                                  "uncertainty_spread", "mask_voxels")})  # fmt: skip
            pending_cases.append(case_row)
            pending_slices.extend(result["slice_rows"])
            if len(pending_cases) >= commit_every:
                commit()
                pending_cases, pending_slices, seq = [], [], seq + 1
        if pending_cases:
            commit()
    summary = {"run_id": run_id, "kind": "refine", "status": "succeeded", "tables": versions,
               "source": cfg.source, "target": cfg.target,
               "refined_target": cfg.refined_target, "work": cfg.work, "threshold": cfg.refine.threshold,
               "slices": slices,
               "members": [m["file"] for m in ensemble["members"]], "ensemble_config_hash": ensemble["config_hash"],
               "cases": counts, "uncertainty": uncertainty_rows, "started_at": started,
               "resources": resources.to_dict(),
               "seconds": round(time.time() - started, 1)}  # fmt: skip
    catalog.write_run(run_id, summary)
    if uncertainty_rows:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(uncertainty_rows), sink)
        write_bytes(join(cfg.work, "refine", f"{run_id}.parquet"), sink.getvalue().to_pybytes(), storage)
    progress(f"refined {counts.get('ok', 0)} case(s), {counts.get('failed', 0)} failed, in {summary['seconds']} s")
    return summary
