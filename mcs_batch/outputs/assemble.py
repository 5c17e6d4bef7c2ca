"""Slices back into a case: mask volume in the source geometry, statistics, catalog rows.

Pure functions of a finished case (its record and its slice rows); the pipeline's writer calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mcs_batch.config import JobConfig
from mcs_batch.io.display import display_shape, to_stored
from mcs_batch.io.volume import place
from mcs_batch.records import CaseRecord, Status, instances_digest, slice_axis_for, spacing_known
from mcs_batch.rows import PromptRecord, target_column, unpack_mask


@dataclass
class TargetVolume:
    mask: np.ndarray  # uint8 [I, J, K], the source's stored grid
    case_row: dict  # catalog fields computed from the slices (mask statistics, timings)
    slice_rows: list[dict]


def mask_volume_ml(record: CaseRecord, voxels: int) -> float | None:
    """The mask's volume in millilitres, or None when the voxel size is not known (spacing_known)."""
    return voxels * float(np.prod(record.spacing_mm)) / 1000.0 if spacing_known(record) else None


def assemble_target(record: CaseRecord, slices: dict[int, dict], j: int, cfg: JobConfig) -> TargetVolume:
    """Mask volume and statistics of target j from the case's slice rows (all present, no errors).
    The slices are placed in the display grid (io/display.py), the mask returned in the stored one."""
    axis = slice_axis_for(record, cfg.slice_axis)
    mask = np.zeros(display_shape(record), np.uint8)
    slice_rows, scores, means, maxima = [], [], [], []
    n_empty_saliency = n_with_mask = 0
    for k in sorted(slices):
        row = slices[k]
        prompts = PromptRecord.decode(row[target_column(j, "prompts")])
        pixels = int(row[target_column(j, "pixels")])
        if pixels:
            place(mask, k, axis, unpack_mask(row[target_column(j, "mask")], (int(row["height"]), int(row["width"]))))
            scores.append(float(row[target_column(j, "score")]))
            n_with_mask += 1
        if prompts.reason:
            n_empty_saliency += 1
        means.append(prompts.saliency_mean)
        maxima.append(prompts.saliency_max)
        slice_rows.append({
            "case_id": record.case_id, "target": cfg.targets[j].name, "slice_index": k,
            "boxes_xyxy": prompts.boxes_xyxy, "points_xy": prompts.points_xy,
            "sam_score": float(row[target_column(j, "score")]), "mask_pixels": pixels,
            "saliency_mean": prompts.saliency_mean, "saliency_max": prompts.saliency_max,
            "reason": prompts.reason,
        })  # fmt: skip
    mask = np.ascontiguousarray(to_stored(mask, record))
    voxels = int(mask.sum())
    n_components = int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1]) if voxels else 0
    case_row = {
        "mask_voxels": voxels,
        "mask_volume_ml": mask_volume_ml(record, voxels),
        "n_components": n_components,
        "n_slices": len(slices),
        "n_slices_with_mask": n_with_mask,
        "n_slices_empty_saliency": n_empty_saliency,
        "sam_score_mean": float(np.mean(scores)) if scores else None,
        "saliency_mean": float(np.mean(means)) if means else None,
        "saliency_max": float(np.max(maxima)) if maxima else None,
        "load_seconds": float(sum(float(r["load_s"]) for r in slices.values())),
        "saliency_seconds": float(sum(float(r["saliency_s"]) for r in slices.values())),
        "sam_seconds": float(sum(float(r["sam_s"]) for r in slices.values())),
    }
    return TargetVolume(mask, case_row, slice_rows)


def base_case_row(record: CaseRecord, target_index: int, cfg: JobConfig) -> dict:
    """The catalog fields every (case, target) row has, whatever its status."""
    target = cfg.targets[target_index]
    return {
        "case_id": record.case_id,
        "target": target.name,
        "prompts": list(target.prompts),
        "status": record.status,
        "error_code": record.error_code,
        "error_message": record.error_message,
        "kind": record.kind,
        "source_uris": record.source_uris,
        "source_keys": record.source_keys,
        "modality": record.modality,
        "study_uid": record.study_uid,
        "series_uid": record.series_uid,
        "shape": record.shape,
        "spacing_mm": record.spacing_mm,
        "affine": record.affine,
        "config_hash": cfg.hash(),
        "warnings": list(record.warnings),
        "instances": instances_digest(record),
    }


def failed_from_slices(slices: dict[int, dict]) -> tuple[str, str] | None:
    """The first (error_code, message) among a case's slice rows, or None when all are fine."""
    for k in sorted(slices):
        if slices[k]["error_code"]:
            return str(slices[k]["error_code"]), str(slices[k]["error_message"])
    return None


def status_of(record: CaseRecord, error: tuple[str, str] | None) -> str:
    if record.status != Status.OK:
        return record.status
    return Status.FAILED if error else Status.OK
