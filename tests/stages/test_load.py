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


def test_a_wave_is_cut_into_load_units_each_decoded_on_its_own(tmp_path):
    """The grouper hands on a wave's cases as one block, and Ray Data runs one task per block: planning
    cuts it into load units (stages/load.plan_units), each decoded by a task of its own. Images go
    together with their case rows, an axial DICOM series is cut at chunk boundaries, a NIfTI volume
    (a gzip stream, decoded whole) stays in one unit; every slice is decoded exactly once."""
    import nibabel as nib
    from PIL import Image

    from mcs_batch.rows import CASE_ROW
    from mcs_batch.testdata.series import write_series
    from tests.io.stage_harness import run_stages

    folder = tmp_path / "wave"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(folder / "images" / f"x{i}.png")
    write_series(folder / "series", n_slices=40)
    nib.save(nib.Nifti1Image(rng.integers(-100, 100, (16, 12, 40), dtype=np.int16), np.eye(4)), folder / "ct.nii.gz")
    outcome = run_stages(folder, load_config(overrides=["resources.slice_chunk=8"]), unit_rows=20)
    assert outcome.findings() == []
    kinds = {c.case_id: c.kind for c in outcome.cases}
    assert sorted(kinds.values()) == ["dicom_series", "image", "image", "image", "image", "image", "image", "nifti"]
    units_of: dict[str, set[int]] = {}
    for u, unit in enumerate(outcome.units):
        for case_id, _, _ in unit:
            units_of.setdefault(case_id, set()).add(u)
        rows = sum(1 if k == CASE_ROW else n for _, k, n in unit)  # what the unit decodes into
        assert rows <= 20 or {kinds[c] for c, _, _ in unit} == {"nifti"}, unit
    series = next(c for c, k in kinds.items() if k == "dicom_series")
    nifti = next(c for c, k in kinds.items() if k == "nifti")
    assert len(units_of[series]) == 3  # 41 rows (its case row, 40 slices in chunks of 8) in units of <= 20
    assert len(units_of[nifti]) == 1  # decoded whole: once, in one task
    series_units = [u for u in outcome.units if any(c == series for c, _, _ in u)]
    assert [(k, n) for c, k, n in series_units[0] if c == series][:2] == [(CASE_ROW, 40), (0, 8)]  # case row first
    for case_id, kind in kinds.items():
        if kind == "image":
            assert len(units_of[case_id]) == 1  # its case row and its slice together (assembled in one block)
    decoded = sorted((str(r["case_id"]), int(r["slice_index"])) for r in outcome.slice_rows)
    assert len(decoded) == len(set(decoded)) == 6 + 40 + 40
