"""Reading what OUT holds, for every reader of it (evaluate, report, train-weak, refine): a catalog row
as a loadable case, a mask file, the job config a row was made with. The tables themselves are read
through `Catalog` (outputs/catalog.py) and the run records through outputs/runs.py; this module is the
rest of the one reading side of OUT, beside the code that writes it.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions, fetch_bytes, filesystem_for
from mcs_batch.outputs.runs import read_run
from mcs_batch.records import CaseKind, CaseRecord

RECORD_COLUMNS = ["case_id", "kind", "source_uris", "source_keys", "status", "modality", "shape", "spacing_mm",
                  "affine", "series_uid", "study_uid", "run_id", "target", "tiny_models", "prompts"]  # fmt: skip


def record_of(row: dict) -> CaseRecord:
    """A loadable CaseRecord from a catalog cases row. The catalog keeps DICOM series files in slice
    order, so file i holds slice i."""
    record = CaseRecord.from_row({k: v for k, v in row.items() if k in RECORD_COLUMNS and v is not None})
    if record.kind == CaseKind.DICOM_SERIES and record.slice_index is None:
        record.slice_index = list(range(len(record.source_uris)))
    return record


def read_mask_image(uri: str, storage: StorageOptions | None) -> nib.Nifti1Image:
    """A catalog mask file (.nii.gz, or .nii) as a NIfTI image (its affine and zooms with it)."""
    fs, _ = filesystem_for(uri, storage)
    data = fetch_bytes(fs, uri)
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def read_mask(uri: str, storage: StorageOptions | None) -> np.ndarray:
    """uint8 [I, J, K] of a catalog mask."""
    return np.asarray(read_mask_image(uri, storage).dataobj, dtype=np.uint8)


def job_config_of_run(catalog, run_id: str | None) -> JobConfig:
    """The segmentation job's config (slice axis, window) a row's run used, from its run record;
    defaults when the run left no record."""
    record = read_run(catalog, run_id) if run_id else None
    return record.job_config() if record is not None else JobConfig()
