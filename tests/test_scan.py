"""The scan on a real local Ray, over local files and over a real S3 endpoint (moto server)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mcs_batch.errors import ConfigError, ErrorCode
from mcs_batch.io.storage import StorageOptions
from mcs_batch.scan import read_manifest, scan
from mcs_batch.testdata.sample import build_sample_archive
from mcs_batch.testdata.series import write_series

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def sample_archive(tmp_path_factory) -> Path:
    return build_sample_archive(tmp_path_factory.mktemp("sample") / "archive")


def comparable(table: pa.Table) -> list[dict]:
    """Manifest rows without the storage-specific URIs (keys relative to the input root remain);
    error messages name their input by URI, so the URI is replaced by its key there."""
    rows = []
    for row in table.to_pylist():
        for uri, key in zip(row.pop("source_uris"), row["source_keys"], strict=True):
            if row["error_message"]:
                row["error_message"] = row["error_message"].replace(uri, key)
        row.pop("bytes_read")
        rows.append(row)
    return sorted(rows, key=lambda r: r["case_id"])


def test_scan_accounts_for_every_object(sample_archive: Path, tmp_path: Path):
    summary = scan([str(sample_archive)], str(tmp_path / "out"), progress=lambda m: None)
    table = read_manifest(str(tmp_path / "out"))
    # keys start with the input's own name (archive/...)
    files = sorted(f"archive/{p.relative_to(sample_archive)}" for p in sample_archive.rglob("*") if p.is_file())
    keys = sorted(k for ks in table.column("source_keys").to_pylist() for k in ks)
    assert keys == files  # every object exactly once, nothing dropped, nothing doubled
    assert summary.objects == len(files) and summary.cases == table.num_rows
    rows = {r["source_keys"][0].split("/")[1] + "/" + r["kind"]: r for r in table.to_pylist()}
    assert rows["ct_series/dicom_series"]["shape"] == [16, 16, 5]
    assert rows["phantom_ct/dicom_series"]["shape"] == [64, 64, 16]
    assert rows["chest_cr/dicom_image"]["modality"] == "CR"
    assert rows["mr/dicom_multiframe"]["status"] == "ok"
    assert rows["nifti/nifti"]["status"] == "ok"
    by_key = {k.removeprefix("archive/"): r for r in table.to_pylist() for k in r["source_keys"]}
    assert (by_key["broken/MR_truncated.dcm"]["status"], by_key["broken/MR_truncated.dcm"]["error_code"]) == (
        "failed",
        ErrorCode.TRUNCATED,
    )
    assert by_key["broken/rtstruct.dcm"]["error_code"] == ErrorCode.NON_IMAGE_OBJECT
    assert by_key["broken/README.txt"]["status"] == "skipped"
    assert summary.by_status == {"ok": 8, "failed": 2, "skipped": 2}
    # patient-identifying attributes never enter the manifest
    assert not {"patient_name", "patient_id", "patient_birth_date"} & set(table.column_names)
    assert (tmp_path / "out" / "scan.json").exists()


def test_case_ids_are_stable_across_runs_and_locations(sample_archive: Path, tmp_path: Path):
    scan([str(sample_archive)], str(tmp_path / "a"), progress=lambda m: None)
    copy = tmp_path / "elsewhere" / "archive"
    copy.parent.mkdir()
    import shutil

    shutil.copytree(sample_archive, copy)
    scan([str(copy)], str(tmp_path / "b"), progress=lambda m: None)
    assert comparable(read_manifest(str(tmp_path / "a"))) == comparable(read_manifest(str(tmp_path / "b")))


def test_include_and_exclude_globs(sample_archive: Path, tmp_path: Path):
    scan([str(sample_archive)], str(tmp_path / "o"), include=["ct_series/*"], progress=lambda m: None)
    assert read_manifest(str(tmp_path / "o")).column("n_files").to_pylist() == [5]
    scan([str(sample_archive)], str(tmp_path / "o"), exclude=["broken/*", "*.png"], progress=lambda m: None)
    keys = [k for ks in read_manifest(str(tmp_path / "o")).column("source_keys").to_pylist() for k in ks]
    assert not any(k.startswith("broken/") or k.endswith(".png") for k in keys)


def test_missing_input_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        scan([str(tmp_path / "nope")], str(tmp_path / "o"), progress=lambda m: None)


def upload(fs, local: Path, bucket: str, prefix: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{bucket}/{prefix}/{p.relative_to(local).as_posix()}")


def test_s3_scan_gives_the_same_manifest_as_the_local_scan(sample_archive: Path, tmp_path: Path, s3_bucket, s3_server):
    bucket, fs = s3_bucket
    upload(fs, sample_archive, bucket, "archive")
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    s3_summary = scan([f"s3://{bucket}/archive"], f"s3://{bucket}/out", storage=storage, progress=lambda m: None)
    scan([str(sample_archive)], str(tmp_path / "local"), progress=lambda m: None)
    s3_table = read_manifest(f"s3://{bucket}/out", storage=storage)
    assert comparable(s3_table) == comparable(read_manifest(str(tmp_path / "local")))
    uris = [u for us in s3_table.column("source_uris").to_pylist() for u in us]
    assert all(u.startswith(f"s3://{bucket}/archive/") for u in uris)
    assert fs.exists(f"{bucket}/out/scan.json")
    # headers only: far fewer bytes fetched than the archive holds (the CR alone is ~1.5 MB)
    total = sum(p.stat().st_size for p in sample_archive.rglob("*") if p.is_file())
    assert s3_summary.bytes_read < total / 4


def test_unreachable_bucket_is_a_config_error(tmp_path: Path, s3_server):
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key="k", secret="s")
    with pytest.raises(ConfigError):
        scan(["s3://no-such-bucket-here/x"], str(tmp_path / "o"), storage=storage, progress=lambda m: None)


def test_split_series_and_gaps_through_ray(tmp_path: Path):
    write_series(tmp_path / "in", series_seed="s", n_slices=6, drop=[2])
    write_series(tmp_path / "in", series_seed="s", prefix="other", n_slices=5, rows=40)  # same UID, other size
    scan([str(tmp_path / "in")], str(tmp_path / "o"), progress=lambda m: None)
    rows = read_manifest(str(tmp_path / "o")).to_pylist()
    assert sorted((r["n_files"], r["shape"][2]) for r in rows) == [(5, 5), (5, 6)]
    assert all(any("split" in w for w in r["warnings"]) for r in rows)
