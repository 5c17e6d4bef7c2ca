"""Cases a worker could not hold fail `too_large` from their headers, before any pixel is decoded
(io/limits.py, applied by the grouper to every case it lets go)."""

from __future__ import annotations

import numpy as np

from mcs_batch.config import JobConfig, load_config
from mcs_batch.io import limits
from mcs_batch.records import CaseRecord
from mcs_batch.stages.load import plan_case

AXIAL = np.diag([-1.0, -1.0, 1.0, 1.0])  # a standard axial DICOM series in RAS: i -> L, j -> P, k -> S


def record(shape, kind: str = "dicom_series", affine=AXIAL) -> CaseRecord:
    return CaseRecord(case_id="c" * 24, kind=kind, source_uris=["file:///big.nii"], source_keys=["big.nii"],
                      shape=list(shape), spacing_mm=[1.0] * 3, affine=np.asarray(affine).ravel().tolist())  # fmt: skip


def check_size(record: CaseRecord, cfg: JobConfig) -> CaseRecord:
    return limits.check_size(record, cfg.resources.size_limits(), cfg.slice_axis)


def test_slices_past_the_pixel_limit_fail_as_too_large():
    cfg = load_config(overrides=["resources.max_image_pixels=1000000"])
    ok = check_size(record((1000, 1000, 3)), cfg)
    assert ok.status == "ok"
    big = check_size(record((1001, 1000, 3)), cfg)
    assert (big.status, big.error_code) == ("failed", "too_large")
    assert "max_image_pixels" in big.error_message and "big.nii" in big.error_message
    assert plan_case(big, slice_chunk=16, axis=2)[0]["n_slices"] == 0  # nothing to decode, a failure row


def test_whole_volume_loads_past_the_voxel_limit_fail():
    cfg = load_config(overrides=["resources.max_volume_voxels=1000", "slice_axis=0"])
    assert check_size(record((10, 10, 10)), cfg).status == "ok"
    assert check_size(record((10, 10, 11)), cfg).error_code == "too_large"  # loaded whole along axis 0
    along_k = load_config(overrides=["resources.max_volume_voxels=1000"])
    assert check_size(record((10, 10, 11)), along_k).status == "ok"  # a series: decoded in chunks along axis 2
    turned = check_size(record((10, 10, 11), affine=np.eye(4)), along_k)  # stored R, A, S: shown reoriented
    assert turned.error_code == "too_large" and "another orientation" in turned.error_message
    assert check_size(record((10, 10, 11), kind="nifti"), along_k).error_code == "too_large"  # NIfTI: whole


def test_a_multiframe_object_is_decoded_whole_so_its_frames_count():
    cfg = load_config(overrides=["resources.max_volume_voxels=1000"])
    assert check_size(record((10, 10, 10), kind="dicom_multiframe"), cfg).status == "ok"
    big = check_size(record((10, 10, 11), kind="dicom_multiframe"), cfg)
    assert big.error_code == "too_large" and "multi-frame" in big.error_message
