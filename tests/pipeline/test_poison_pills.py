"""No poison pills, no silent gaps: one bad value never stops a job, one failed read never hides in an
ok row. The job end to end on a real local Ray (tiny models) over inputs that broke it before:

1. a series read through S3 that fails some requests (503s, dropped connections, one member whose
   every GET fails: a fault-injecting proxy in front of the S3 test endpoint): the series is never ok
   with a member missing; the next run, without faults, commits it whole;
2. a 12-file series with a NaN in one file's ImagePositionPatient: the job (and `scan`) finish, the 11
   other files form the volume, the NaN file fails `bad_geometry`;
3. single DICOM images with a NaN position or orientation: `bad_geometry`, never an ok row with a NaN
   affine;
4. a PNG whose header claims 20000 x 20000 pixels: `too_large` from the header, not `internal_error`;
and a file whose decoding aborts the worker process (a native decoder's crash, injected): its case
fails after two deaths instead of its task being retried forever.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from mcs_batch.scan import read_manifest, scan
from mcs_batch.testdata.series import write_series
from tests.faulty_s3 import Faults, FaultyS3
from tests.io.header_mutations import png_with_size
from tests.pipeline.test_job import QUIET, job

pytestmark = pytest.mark.usefixtures("ray_local")


def set_position(path: Path, value: list[str], keyword: str = "ImagePositionPatient") -> None:
    ds = pydicom.dcmread(path)
    setattr(ds, keyword, value)
    ds.save_as(path)


def rows_by_key(out: str, storage: StorageOptions | None = None) -> dict[str, dict]:
    """Every committed row, by each of its source keys (each key in exactly one row)."""
    rows = Catalog(out, storage=storage).cases().to_pylist()
    keys = [k for r in rows for k in r["source_keys"]]
    assert len(keys) == len(set(keys)), "an object in two case rows"
    return {k: r for r in rows for k in r["source_keys"]}


@pytest.fixture(scope="module")
def broken_archive(tmp_path_factory) -> Path:
    """archive/nan-series (12 files, the 6th by position with a NaN z), archive/single/{nan-ipp,
    nan-iop}.dcm, archive/img/{huge.png (claims 20000 x 20000), crash.png, fine.png}."""
    root = tmp_path_factory.mktemp("poison") / "archive"
    series = write_series(root / "nan-series", rows=16, cols=16, n_slices=12, series_seed="nan", shuffle_seed=None)
    set_position(series[5], ["-10", "-20", "NaN"])
    (root / "single").mkdir()
    for name, keyword, value in (("nan-ipp", "ImagePositionPatient", ["0", "NaN", "0"]),
                                 ("nan-iop", "ImageOrientationPatient", ["1", "0", "0", "0", "NaN", "0"])):  # fmt: skip
        made = write_series(root / "tmp", rows=16, cols=16, n_slices=1, series_seed=name)[0]
        set_position(made, value, keyword)
        made.rename(root / "single" / f"{name}.dcm")
    shutil.rmtree(root / "tmp")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for name in ("crash", "fine"):
        image = rng.integers(0, 60, (24, 32), dtype=np.uint8)
        image[6:18, 8:24] = 220
        Image.fromarray(image).save(root / "img" / f"{name}.png")
    (root / "img" / "huge.png").write_bytes(png_with_size((root / "img" / "fine.png").read_bytes(), 20000, 20000))
    return root


@pytest.fixture(scope="module")
def broken_run(broken_archive: Path, tmp_path_factory):
    """One job over the broken archive (and the decoding of img/crash.png aborting its worker)."""
    tmp = tmp_path_factory.mktemp("poison-run")
    out = str(tmp / "out")
    cfg = job([broken_archive], out, tmp, "testing.crash_decoding_key=archive/img/crash.png")
    summary = run_job(cfg, **QUIET)  # returns: the job finished (exit 0 from the command line)
    return summary, rows_by_key(out)


def test_a_nan_position_fails_that_file_and_the_other_eleven_form_the_volume(broken_run):
    summary, rows = broken_run
    assert not summary.aborted
    nan_file = rows["archive/nan-series/slice0005.dcm"]
    assert (nan_file["status"], nan_file["error_code"]) == ("failed", "bad_geometry")
    assert "ImagePositionPatient" in nan_file["error_message"] and "not finite" in nan_file["error_message"]
    volume = rows["archive/nan-series/slice0000"]
    assert volume["status"] == "ok" and len(volume["source_keys"]) == 11
    assert volume["shape"] == [16, 16, 12]  # its position stays in the volume, an empty slice, and is said so
    assert np.all(np.isfinite(volume["affine"]))
    warnings = " ".join(volume["warnings"])
    assert "slice0005.dcm (bad_geometry)" in warnings and "gap: 1 missing slice" in warnings


def test_nan_geometry_of_a_single_image_fails_bad_geometry(broken_run):
    _, rows = broken_run
    for name, attribute in (("nan-ipp", "ImagePositionPatient"), ("nan-iop", "ImageOrientationPatient")):
        row = rows[f"archive/single/{name}.dcm"]
        assert (row["status"], row["error_code"]) == ("failed", "bad_geometry"), row
        assert attribute in row["error_message"] and row["mask_uri"] is None
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok and all(np.all(np.isfinite(r["affine"])) and np.all(np.isfinite(r["spacing_mm"])) for r in ok)


def test_a_png_claiming_20000_squared_pixels_fails_too_large_from_its_header(broken_run):
    _, rows = broken_run
    row = rows["archive/img/huge.png"]
    assert (row["status"], row["error_code"]) == ("failed", "too_large")
    assert "400,000,000 pixels exceed resources.max_image_pixels" in row["error_message"]
    assert row["shape"] == [20000, 20000, 1]


def test_a_file_that_crashes_its_decoder_fails_after_two_deaths_and_the_rest_go_on(broken_run):
    _, rows = broken_run
    crash = rows["archive/img/crash.png"]
    assert (crash["status"], crash["error_code"]) == ("failed", "decode_error")
    assert "worker process died 2 times while decoding" in crash["error_message"]
    assert rows["archive/img/fine.png"]["status"] == "ok"


def test_scan_finishes_on_the_same_archive_with_every_file_in_one_row(broken_archive: Path, tmp_path: Path):
    summary = scan([str(broken_archive)], str(tmp_path / "scan"), progress=lambda m: None)
    table = read_manifest(str(tmp_path / "scan"))
    by_key = {k: r for r in table.to_pylist() for k in r["source_keys"]}
    files = sorted(f"archive/{p.relative_to(broken_archive).as_posix()}" for p in broken_archive.rglob("*")
                   if p.is_file())  # fmt: skip
    assert sorted(by_key) == files and summary.objects == len(files)
    assert by_key["archive/nan-series/slice0005.dcm"]["error_code"] == "bad_geometry"
    assert by_key["archive/img/huge.png"]["error_code"] == "too_large"  # the scan applies the default limits


# -- 1. a flaky store -------------------------------------------------------------------------------------


def test_a_flaky_header_read_never_gives_an_ok_series_with_a_member_missing(tmp_path: Path, s3_bucket, s3_server):
    bucket, fs = s3_bucket
    local = write_series(tmp_path / "ct", rows=16, cols=16, n_slices=12, series_seed="flaky", shuffle_seed=None)
    for p in local:
        fs.put_file(str(p), f"{bucket}/archive/ct/{p.name}")
    broken = f"{bucket}/archive/ct/{local[6].name}"
    faults = Faults(prefixes=(f"{bucket}/archive/",), rate_503=0.15, rate_drop=0.05, always_fail=(broken,), seed=7)
    proxy = FaultyS3(s3_server["endpoint_url"], faults)
    try:
        storage = StorageOptions(endpoint_url=proxy.endpoint_url, key=s3_server["key"], secret=s3_server["secret"])
        inputs, out = [f"s3://{bucket}/archive"], f"s3://{bucket}/out"
        first = run_job(job(inputs, out, tmp_path), storage=storage, **QUIET)
        counts = proxy.counts()
        assert counts.get("garbage", 0) > 0 and counts.get("503", 0) > 0  # the store did fail
        rows = rows_by_key(out, storage)
        series = rows["archive/ct/slice0000"]
        assert (series["status"], series["error_code"]) == ("failed", "unreadable"), series
        assert "archive/ct/slice0006" in series["error_message"] and series["mask_uri"] is None
        member = rows["archive/ct/slice0006"]
        assert (member["status"], member["error_code"], member["retryable"]) == ("failed", "unreadable", True)
        assert not [r for r in rows.values() if r["status"] == "ok"]  # no ok row with 11 of 12 files

        proxy.heal()
        second = run_job(job(inputs, out, tmp_path), storage=storage, **QUIET)  # no --retry-failed
        rows = rows_by_key(out, storage)
        whole = rows["archive/ct/slice0006"]
        assert whole["status"] == "ok" and whole["run_id"] == second.run_id
        assert sorted(whole["source_keys"]) == sorted(f"archive/ct/{p.name}" for p in local)  # all 12, one row
        assert not any("gap" in w for w in whole["warnings"]) and whole["shape"] == [16, 16, 12]
        assert first.run_id != second.run_id and len({json.dumps(r["source_keys"]) for r in rows.values()}) == 1
    finally:
        proxy.stop()
