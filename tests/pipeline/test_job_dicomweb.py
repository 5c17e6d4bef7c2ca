"""A job that reads a PACS and stores its results back, against a real Orthanc (tests/orthanc.py) and a
real local Ray with tiny models: `segment dicomweb://...` with outputs.dicomweb_store. The SEGs read
back from Orthanc by WADO-RS reference their source series and equal the NIfTI masks voxel for voxel;
a re-run stores nothing new; a series added to the PACS is the only one the next run reads."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from mcs_batch.io.dicom_header import read_dicom_header
from mcs_batch.io.dicomweb import client_for
from mcs_batch.io.series import cases_from_headers
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.pacs_store import stored_table
from mcs_batch.pipeline import run_job
from mcs_batch.query import query_arrow
from mcs_batch.records import Status
from mcs_batch.testdata.series import write_series
from tests.pipeline.test_job import QUIET, job

pytestmark = pytest.mark.usefixtures("ray_local")
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def _file_case_ids(*folders: Path) -> set[str]:
    """The case ids the job gives these series when it reads them as files."""
    ids = set()
    for folder in folders:
        headers = []
        for p in sorted(folder.iterdir()):
            with open(p, "rb") as f:
                headers.append(read_dicom_header(f, uri=p.as_uri(), rel=p.name, size=p.stat().st_size))
        ids |= {r.case_id for r in cases_from_headers(headers) if r.status == Status.OK}
    return ids


def _segs_in(orthanc) -> list[dict]:
    return client_for(orthanc.dicomweb).search_for_instances(search_filters={"Modality": "SEG"})


def _run_record(out: Path, run_id: str) -> dict:
    return json.loads((out / "runs" / f"{run_id}.json").read_text())


def test_segment_from_a_pacs_and_store_the_segs_back(orthanc, tmp_path: Path):
    second = tmp_path / "second"
    write_series(second, rows=32, cols=32, n_slices=5, series_seed="pacs-second")
    orthanc.upload(sorted(CT5N.iterdir()))
    orthanc.upload(sorted(second.iterdir()))
    out = tmp_path / "out"
    cfg = job([orthanc.uri("Modality=CT")], out, tmp_path, "outputs.dicom_seg=true",
              f"outputs.dicomweb_store={orthanc.uri()}")  # fmt: skip
    first = run_job(cfg, **QUIET)

    catalog = Catalog(str(out))
    rows = catalog.cases().to_pylist()
    assert [(r["kind"], r["status"]) for r in rows] == [("dicom_series", "ok")] * 2
    assert {r["case_id"] for r in rows} == _file_case_ids(CT5N, second)  # the same cases as from files
    assert all(u.startswith(orthanc.uri() + "/studies/") for r in rows for u in r["source_uris"])

    stored = stored_table(str(out), None).to_pyarrow_table().to_pylist()
    assert sorted((s["case_id"], s["status"]) for s in stored) == sorted((r["case_id"], "stored") for r in rows)
    assert all(s["seg_stored_at"] is not None and s["http_status"] == 200 for s in stored)
    record = _run_record(out, first.run_id)
    assert record["seg_store"]["stored"] == 2 and record["seg_store"]["failed"] == {}

    client = client_for(orthanc.dicomweb)
    by_case = {s["case_id"]: s for s in stored}
    for row in rows:
        s = by_case[row["case_id"]]
        study = row["source_uris"][0].split("/studies/")[1].split("/")[0]
        seg_ds = client.retrieve_instance(study, s["series_instance_uid"], s["sop_instance_uid"])  # WADO-RS
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == row["series_uid"]
        assert seg.SOPInstanceUID == pydicom.dcmread(row["seg_uri"].removeprefix("file://")).SOPInstanceUID
        sources = [u.rsplit("/", 1)[-1] for u in row["source_uris"]]
        pixels = seg.get_pixels_by_source_instance(sources, segment_numbers=[1])
        nifti = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(Path(row["mask_uri"][7:]).read_bytes())).dataobj)
        assert row["shape"][2] == len(sources)
        np.testing.assert_array_equal(np.transpose(pixels[..., 0], (2, 1, 0)), nifti)
    assert len(_segs_in(orthanc)) == 2

    again = run_job(cfg, **QUIET)  # nothing new: no header read, no case, no SEG sent
    record = _run_record(out, again.run_id)
    assert again.cases == 0 and record["scan"]["probed"] == 0
    assert record["seg_store"]["pending"] == 0 and len(stored_table(str(out), None).to_pyarrow_table()) == 2
    assert len(_segs_in(orthanc)) == 2

    third = tmp_path / "third"
    write_series(third, rows=24, cols=24, n_slices=4, series_seed="pacs-third")
    orthanc.upload(sorted(third.iterdir()))
    grown = run_job(cfg, **QUIET)  # the index knows the other instances: only the new series is read
    record = _run_record(out, grown.run_id)
    assert grown.cases == 1 and record["scan"]["probed"] == 4 and record["scan"]["cached"] == 10
    assert record["seg_store"] == {**record["seg_store"], "pending": 1, "stored": 1}
    assert len(_segs_in(orthanc)) == 3
    seen = query_arrow(str(out), "SELECT count(*) AS n FROM stored WHERE status = 'stored'", storage=None)
    assert seen.column("n").to_pylist() == [3]


@pytest.mark.slow
def test_an_instance_the_pacs_cannot_retrieve_fails_its_case_and_the_next_run_redoes_it(orthanc, tmp_path: Path):
    """One instance cannot be retrieved (the PACS answers 500 for it, through a fault-injecting proxy):
    its series fails `unreadable` (transient, as storage faults on S3), the other series is segmented
    and stored, the job goes on. Once the PACS serves it again, the next run redoes that case only."""
    from tests.faulty_dicomweb import Faults, start_proxy

    second = tmp_path / "second"
    write_series(second, rows=32, cols=32, n_slices=5, series_seed="pacs-ok")
    orthanc.upload(sorted(CT5N.iterdir()))
    orthanc.upload(sorted(second.iterdir()))
    lost = str(pydicom.dcmread(sorted(CT5N.iterdir())[2], stop_before_pixels=True).SOPInstanceUID)
    faults = Faults(fail_path=f"/instances/{lost}", fail_status=500)
    proxy, port = start_proxy(orthanc.port, faults)
    try:
        out = tmp_path / "out"
        source = f"dicomweb://127.0.0.1:{port}/dicom-web"
        cfg = job([source], out, tmp_path, "outputs.dicom_seg=true", f"outputs.dicomweb_store={orthanc.uri()}")
        first = run_job(cfg, **QUIET)
        assert first.by_status == {"ok": 1, "failed": 1} and faults.failed >= 1
        (failed,) = [r for r in Catalog(str(out)).cases().to_pylist() if r["status"] == "failed"]
        assert failed["error_code"] == "unreadable" and failed["retryable"]
        assert failed["series_uid"] == "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
        assert len(_segs_in(orthanc)) == 1

        faults.fail_path = ""  # the PACS serves it again
        again = run_job(cfg, **QUIET)
        # the failed case redone; the SEG the first run stored is in the PACS now, listed, and skipped
        assert again.by_status == {"ok": 1, "skipped": 1}
        rows = Catalog(str(out)).cases().to_pylist()
        assert sorted((r["status"], r["modality"]) for r in rows) == [("ok", "CT"), ("ok", "CT"), ("skipped", "SEG")]
        assert len(_segs_in(orthanc)) == 2
    finally:
        proxy.shutdown()


@pytest.mark.slow
def test_a_store_that_fails_is_recorded_and_tried_again_by_the_next_run(orthanc, orthanc_basic_auth, tmp_path: Path):
    """The source PACS answers; the store wants credentials the job does not have: the SEGs are written
    and their rows committed, the store's refusal is a `stored` row with its code, and the next run
    (credentials given) stores them, once."""
    orthanc.upload(sorted(CT5N.iterdir()))
    out = tmp_path / "out"
    cfg = job([orthanc.uri()], out, tmp_path, "outputs.dicom_seg=true",
              f"outputs.dicomweb_store={orthanc_basic_auth.uri()}")  # fmt: skip
    first = run_job(cfg, **QUIET)
    assert first.by_status == {"ok": 1}
    (failed,) = stored_table(str(out), None).to_pyarrow_table().to_pylist()
    assert (failed["status"], failed["error_code"], failed["http_status"]) == ("failed", "store_refused", 401)
    assert failed["seg_stored_at"] is None
    assert orthanc_basic_auth.get_json("/statistics")["CountInstances"] == 0  # the store holds nothing

    from mcs_batch.io.dicomweb import DicomWebAuth
    from mcs_batch.io.storage import StorageOptions

    storage = StorageOptions(dicomweb=DicomWebAuth(username="tester", password="test-only-password"))
    second = run_job(cfg, storage=storage, **QUIET)
    assert second.cases == 0  # nothing segmented again
    rows = stored_table(str(out), None).to_pyarrow_table().to_pylist()
    assert sorted(r["status"] for r in rows) == ["failed", "stored"]
    assert orthanc_basic_auth.get_json("/statistics")["CountInstances"] == 1
