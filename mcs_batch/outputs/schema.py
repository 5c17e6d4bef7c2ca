"""Parquet schemas of everything mcs-batch writes, versioned. Bump the version on any change."""

from __future__ import annotations

import pyarrow as pa

MANIFEST_SCHEMA_VERSION = "1"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source_uris", pa.list_(pa.string())),
        pa.field("source_keys", pa.list_(pa.string())),
        pa.field("n_files", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("study_uid", pa.string()),
        pa.field("series_uid", pa.string()),
        pa.field("shape", pa.list_(pa.int32())),
        pa.field("spacing_mm", pa.list_(pa.float64())),
        pa.field("affine", pa.list_(pa.float64())),
        pa.field("slice_index", pa.list_(pa.int32())),
        pa.field("volume_index", pa.int32()),
        pa.field("transfer_syntax", pa.string()),
        pa.field("photometric", pa.string()),
        pa.field("warnings", pa.list_(pa.string())),
        pa.field("bytes_read", pa.int64()),
    ],
    metadata={"mcs_batch.table": "manifest", "mcs_batch.schema_version": MANIFEST_SCHEMA_VERSION},
)


def manifest_table(rows: list[dict]) -> pa.Table:
    """Rows (CaseRecord.to_row()) as a table with exactly the manifest schema."""
    return table_from_rows(rows, MANIFEST_SCHEMA)


# 2: cases.uncertainty, cases.uncertainty_spread; 3: cases.attempts, retryable, history, instances;
# 4: cases.seg_uri (columns a version added read as null in older parts)
CATALOG_SCHEMA_VERSION = "4"

# One row per (case, target): the contract with curation teams (see README).
CASES_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("prompts", pa.list_(pa.string())),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("source_uris", pa.list_(pa.string())),
        pa.field("source_keys", pa.list_(pa.string())),
        pa.field("modality", pa.string()),
        pa.field("study_uid", pa.string()),
        pa.field("series_uid", pa.string()),
        pa.field("shape", pa.list_(pa.int32())),
        pa.field("spacing_mm", pa.list_(pa.float64())),
        pa.field("affine", pa.list_(pa.float64())),
        pa.field("mask_uri", pa.string()),
        pa.field("mask_png_uri", pa.string()),
        pa.field("seg_uri", pa.string()),  # masks/<case_id>/<target>.seg.dcm (outputs.dicom_seg, DICOM cases)
        pa.field("mask_voxels", pa.int64()),
        pa.field("mask_volume_ml", pa.float64()),
        pa.field("n_components", pa.int32()),
        pa.field("n_slices", pa.int32()),
        pa.field("n_slices_with_mask", pa.int32()),
        pa.field("n_slices_empty_saliency", pa.int32()),
        pa.field("sam_score_mean", pa.float64()),
        pa.field("saliency_mean", pa.float64()),
        pa.field("saliency_max", pa.float64()),
        pa.field("config_hash", pa.string()),
        pa.field("clip_sha256", pa.string()),
        pa.field("sam_sha256", pa.string()),
        pa.field("tiny_models", pa.bool_()),
        pa.field("run_id", pa.string()),
        pa.field("load_seconds", pa.float64()),
        pa.field("saliency_seconds", pa.float64()),
        pa.field("sam_seconds", pa.float64()),
        pa.field("committed_at", pa.string()),
        pa.field("warnings", pa.list_(pa.string())),
        # retries: a failure with a transient code (storage, out of memory) is redone by later runs
        pa.field("attempts", pa.int32()),  # runs that tried this pair, this one included
        pa.field("retryable", pa.bool_()),  # a later run retries it (transient, attempts to spare)
        pa.field("history", pa.list_(pa.string())),  # the earlier attempts' outcomes, oldest first
        # a DICOM series' instance set (records.instances_digest): another set later redoes the case
        pa.field("instances", pa.string()),
        # refined targets (`<target>@weak`, mcs_batch/train/weak): the ensemble's uncertainty of the case
        pa.field("uncertainty", pa.float64()),  # entropy of the mean probability / mask boundary length
        pa.field("uncertainty_spread", pa.float64()),  # spread of the foreground probability across checkpoints
    ],
    metadata={"mcs_batch.table": "cases", "mcs_batch.schema_version": CATALOG_SCHEMA_VERSION},
)

# One row per (case, target, slice) that went through the models.
SLICES_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("boxes_xyxy", pa.list_(pa.list_(pa.float32()))),
        pa.field("points_xy", pa.list_(pa.list_(pa.float32()))),
        pa.field("sam_score", pa.float64()),
        pa.field("mask_pixels", pa.int64()),
        pa.field("saliency_mean", pa.float64()),
        pa.field("saliency_max", pa.float64()),
        pa.field("reason", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    metadata={"mcs_batch.table": "slices", "mcs_batch.schema_version": CATALOG_SCHEMA_VERSION},
)


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows as a table with exactly `schema` (missing keys are null)."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


EVALUATION_SCHEMA_VERSION = "1"

# `mcs-batch evaluate`: one row per (dataset, target, ground-truth case), in
# OUT/catalog/evaluation/<dataset>--<target>.parquet (replaced as a whole by a new evaluation of the pair).
# status: ok (scored) | failed (the prediction failed or its mask is unreadable: scored 0) |
#         missing (no prediction for this truth: scored 0) | truth_error (the truth cannot be compared: not scored)
# dice, nsd in [0, 1]; hd95 in `unit` (mm, or px where the pixel size is unknown); see mcs_batch/eval/metrics.py.
EVALUATION_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("truth_key", pa.string(), nullable=False),  # the truth's key (path without extension)
        pa.field("truth_uris", pa.list_(pa.string())),
        pa.field("truth_kind", pa.string()),  # image | nifti | seg
        pa.field("case_id", pa.string()),  # the matched prediction (null when missing)
        pa.field("matched_by", pa.string()),  # case_id | series_uid | sop_uid | key | name | none
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),  # the prediction's code, or no_prediction / unreadable_mask / bad_truth
        pa.field("error_message", pa.string()),
        pa.field("dice", pa.float64()),
        pa.field("nsd", pa.float64()),
        pa.field("hd95", pa.float64()),
        pa.field("tolerance", pa.float64()),  # NSD tolerance, in `unit`
        pa.field("unit", pa.string()),  # mm | px
        pa.field("ndim", pa.int32()),  # 2 (an image or one slice) or 3 (a volume)
        pa.field("shape", pa.list_(pa.int32())),
        pa.field("spacing", pa.list_(pa.float64())),  # per axis, in `unit`
        pa.field("truth_voxels", pa.int64()),
        pa.field("pred_voxels", pa.int64()),
        pa.field("mask_uri", pa.string()),
        pa.field("source_keys", pa.list_(pa.string())),
        pa.field("config_hash", pa.string()),
        pa.field("ablation", pa.string()),  # the job's `ablation` row (full = the method)
        pa.field("tiny_models", pa.bool_()),
        pa.field("run_id", pa.string()),
        pa.field("evaluation_id", pa.string()),
        pa.field("evaluated_at", pa.string()),
    ],
    metadata={"mcs_batch.table": "evaluation", "mcs_batch.schema_version": EVALUATION_SCHEMA_VERSION},
)
