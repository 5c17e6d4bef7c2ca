"""dicomweb:// inputs against a real Orthanc (tests/orthanc.py): URIs checked, the query's series
listed, headers from series metadata equal to headers read from the files, instances retrieved as
stored, and every bad input said in one line (ConfigError) or failed as a row (CaseError)."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mcs_batch.archive.listing import top_prefixes
from mcs_batch.archive.probe import probe_refs
from mcs_batch.errors import CaseError, ConfigError, ErrorCode
from mcs_batch.io.dicom_header import DicomHeader, read_dicom_header
from mcs_batch.io.dicomweb import DicomWebAuth, parse_uri
from mcs_batch.io.discover import ObjectRef
from mcs_batch.io.series import cases_from_headers
from mcs_batch.io.storage import StorageOptions, fetch_bytes, filesystem_for
from mcs_batch.records import Status
from mcs_batch.testdata.series import write_series

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
CT5N_SERIES = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("dicomweb://", "names a host"),
        ("dicomweb:///dicom-web", "names a host"),
        ("dicomweb://pacs:99999/dicom-web", "bad port"),
        ("dicomweb://pacs:abc/dicom-web", "bad port"),
        ("dicomweb://user:pw@pacs/dicom-web", "no credentials"),
        ("dicomweb://pacs/dicom-web?NotAKeyword=1", "'NotAKeyword' is not a DICOM keyword"),
        ("dicomweb://pacs/dicom-web?Modality", "malformed QIDO-RS query"),
        ("dicomweb://pacs/dicom-web/studies/1.2/series/abc", "expected .../studies/UID"),
        ("dicomweb://pacs/dicom-web/studies/1.2?Modality=CT", "a query belongs on the server's root"),
    ],
)
def test_a_malformed_uri_is_one_config_error(uri: str, says: str):
    with pytest.raises(ConfigError, match=None) as e:
        filesystem_for(uri)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_uris_name_the_server_root_the_query_and_objects():
    loc = parse_uri("dicomwebs://pacs.example:8443/dicom-web/?StudyDate=20250101-20251231&ModalitiesInStudy=CT")
    assert loc.base_url == "https://pacs.example:8443/dicom-web"
    assert loc.query == (("StudyDate", "20250101-20251231"), ("ModalitiesInStudy", "CT"))
    obj = parse_uri("dicomweb://pacs/wado/studies/1.2/series/1.2.3/instances/1.2.3.4")
    assert (obj.base_url, obj.study, obj.series, obj.instance) == ("http://pacs/wado", "1.2", "1.2.3", "1.2.3.4")
    assert parse_uri("dicomweb://pacs/dicom-web?0020000D=1.2&limit=10").query == (("0020000D", "1.2"), ("limit", "10"))
    assert "tok-123" not in repr(StorageOptions(dicomweb=DicomWebAuth(token="tok-123")))
    assert "pw" not in repr(DicomWebAuth(username="u", password="pw"))


def _file_headers(paths: list[Path]) -> list[DicomHeader]:
    headers = []
    for p in paths:
        with open(p, "rb") as f:
            headers.append(read_dicom_header(f, uri=p.as_uri(), rel=p.name, size=p.stat().st_size))
    return headers


def test_series_are_listed_by_query_and_headers_come_from_metadata(orthanc, tmp_path: Path):
    synthetic = write_series(tmp_path / "mr", rows=20, cols=16, n_slices=4, modality="MR", series_seed="pacs-mr")
    orthanc.upload(sorted(CT5N.iterdir()))
    orthanc.upload(synthetic)

    both = top_prefixes([orthanc.uri()], storage=None)
    assert len(both) == 2 and all(p.recursive for p in both)
    ct_only = top_prefixes([orthanc.uri("Modality=CT")], storage=None)
    assert [p.path.rsplit("/", 1)[-1] for p in ct_only] == [CT5N_SERIES]

    fs, _ = filesystem_for(orthanc.uri())
    listed = fs.find(ct_only[0].path, detail=True)
    assert len(listed) == 5 and all(i["type"] == "file" for i in listed.values())
    assert {i["version"] for i in listed.values()} == {str(pydicom.dcmread(p).SOPInstanceUID) for p in CT5N.iterdir()}
    refs = [ObjectRef(uri=fs.unstrip_protocol(p), rel=p.split("/", 1)[1], size=0) for p in sorted(listed)]
    payloads = [json.loads(p) for p in probe_refs(refs, storage=None, threads=4)]
    from_web = [DicomHeader.from_dict(p["header"]) for p in payloads]
    from_files = _file_headers(sorted(CT5N.iterdir()))
    assert all(h.has_pixel_data and not h.error_code for h in from_web)
    assert sum(h.bytes_read for h in from_web) == 0  # no pixels, no instance fetched
    (web_case,) = [r for r in cases_from_headers(from_web) if r.status == Status.OK]
    (file_case,) = [r for r in cases_from_headers(from_files) if r.status == Status.OK]
    assert web_case.case_id == file_case.case_id  # the same series is the same case, wherever it is read
    assert web_case.shape == file_case.shape and web_case.series_uid == CT5N_SERIES
    np.testing.assert_allclose(web_case.affine, file_case.affine)
    order = {u.rsplit("/", 1)[-1]: k for u, k in zip(web_case.source_uris, web_case.slice_index, strict=True)}
    file_order = {}
    for u, k in zip(file_case.source_uris, file_case.slice_index, strict=True):
        file_order[str(pydicom.dcmread(u.removeprefix("file://"), stop_before_pixels=True).SOPInstanceUID)] = k
    assert order == file_order

    # retrieval: the instance as stored, pixel for pixel
    instance = sorted(listed)[0]
    data = fetch_bytes(fs, fs.unstrip_protocol(instance))
    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, CT5N.iterdir())}
    retrieved = pydicom.dcmread(io.BytesIO(data))
    np.testing.assert_array_equal(retrieved.pixel_array, sources[instance.rsplit("/", 1)[1]].pixel_array)


def test_bad_servers_and_queries_are_one_line_each(orthanc, orthanc_basic_auth):
    orthanc.upload(sorted(CT5N.iterdir()))
    with pytest.raises(ConfigError, match="the QIDO-RS query matches no series"):
        top_prefixes([orthanc.uri("Modality=MR")], storage=None)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ConfigError, match="cannot reach the DICOMweb server"):
        top_prefixes([f"dicomweb://127.0.0.1:{closed}/dicom-web"], storage=None)

    orthanc_basic_auth.upload(sorted(CT5N.iterdir()))
    with pytest.raises(ConfigError, match=r"refused access \(HTTP 401") as e:
        top_prefixes([orthanc_basic_auth.uri()], storage=None)
    assert "\n" not in str(e.value)
    wrong = StorageOptions(dicomweb=DicomWebAuth(username="tester", password="wrong"))
    with pytest.raises(ConfigError, match="HTTP 401"):
        top_prefixes([orthanc_basic_auth.uri()], storage=wrong)
    right = StorageOptions(dicomweb=DicomWebAuth(username="tester", password="test-only-password"))
    assert len(top_prefixes([orthanc_basic_auth.uri()], storage=right)) == 1


def test_an_instance_the_server_lacks_fails_as_storage(orthanc):
    orthanc.upload(sorted(CT5N.iterdir()))
    (series,) = top_prefixes([orthanc.uri()], storage=None)
    missing = f"dicomweb://{series.path}/instances/1.2.3.999"
    fs, _ = filesystem_for(missing)
    with pytest.raises(CaseError, match="object not found") as e:
        fetch_bytes(fs, missing)
    assert e.value.code == ErrorCode.UNREADABLE  # transient: the next run tries again


def _scan(server, out: Path, **extra: str):
    """`mcs-batch scan` of the server's root, with only `extra` of the DICOMWEB_* variables."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DICOMWEB_", "RAY_ADDRESS"))}
    args = [sys.executable, "-m", "mcs_batch.cli", "scan", server.uri(), "--out", str(out), "--num-cpus", "1"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**env, **extra})


def test_the_cli_refuses_a_server_that_wants_credentials_in_one_line(orthanc_basic_auth, tmp_path: Path):
    orthanc_basic_auth.upload(sorted(CT5N.iterdir()))
    refused = _scan(orthanc_basic_auth, tmp_path / "o", DICOMWEB_USER="tester", DICOMWEB_PASSWORD="wrong-one")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("mcs-batch: error:")]
    assert "refused access (HTTP 401" in line and "wrong-one" not in refused.stderr


@pytest.mark.slow
def test_the_cli_reads_credentials_from_a_file_the_environment_names(orthanc_basic_auth, tmp_path: Path):
    orthanc_basic_auth.upload(sorted(CT5N.iterdir()))
    credentials = tmp_path / "pacs.json"
    credentials.write_text(json.dumps({"username": "tester", "password": "test-only-password"}))
    scanned = _scan(orthanc_basic_auth, tmp_path / "o", DICOMWEB_CREDENTIALS_FILE=str(credentials))
    assert scanned.returncode == 0, scanned.stderr[-2000:]
    assert "test-only-password" not in scanned.stderr + scanned.stdout


def test_a_busy_server_is_retried_honouring_retry_after_and_never_flooded(orthanc, tmp_path: Path):
    """Through a proxy that answers the first two series searches 429 with Retry-After: 1 (as an
    overloaded PACS does), the listing waits as asked and succeeds; 20 concurrent reads of instances
    hold at most CONNECTIONS requests at the server at once."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from mcs_batch.io.dicomweb import CONNECTIONS
    from tests.faulty_dicomweb import Faults, start_proxy

    paths = write_series(tmp_path / "ct", rows=16, cols=16, n_slices=20, series_seed="pacs-busy")
    orthanc.upload(paths)
    faults = Faults(busy=2, busy_path="/dicom-web/series", status=429, retry_after="1")
    proxy, port = start_proxy(orthanc.port, faults)
    try:
        root = f"dicomweb://127.0.0.1:{port}/dicom-web"
        start = time.monotonic()
        (series,) = top_prefixes([root], storage=None)
        assert len(faults.busy_answers) == 2 and faults.busy == 0
        assert time.monotonic() - start >= 1.9  # two waits of the 1 s asked for, not the 0-0.5 s of back-off
        assert faults.busy_answers[1] - faults.busy_answers[0] >= 0.95

        fs, _ = filesystem_for(root)
        instances = sorted(fs.find(series.path))
        assert len(instances) == 20
        faults.delay, faults.max_in_flight = 0.3, 0
        with ThreadPoolExecutor(max_workers=20) as pool:
            sizes = list(pool.map(lambda p: len(fetch_bytes(fs, fs.unstrip_protocol(p))), instances))
        assert all(s > 16 * 16 * 2 for s in sizes)
        assert 1 < faults.max_in_flight <= CONNECTIONS
    finally:
        proxy.shutdown()


def test_two_queries_matching_one_series_list_it_once(orthanc):
    orthanc.upload(sorted(CT5N.iterdir()))
    prefixes = top_prefixes([orthanc.uri("Modality=CT"), orthanc.uri("SeriesNumber=5")], storage=None)
    assert [p.path.rsplit("/", 1)[-1] for p in prefixes] == [CT5N_SERIES]


def test_a_server_without_series_metadata_gets_whole_instance_reads_said_once(orthanc, caplog):
    from tests.faulty_dicomweb import Faults, start_proxy

    orthanc.upload(sorted(CT5N.iterdir()))
    proxy, port = start_proxy(orthanc.port, Faults(refuse_metadata=406))
    try:
        root = f"dicomweb://127.0.0.1:{port}/dicom-web"
        (series,) = top_prefixes([root], storage=None)
        fs, _ = filesystem_for(root)
        refs = [ObjectRef(uri=fs.unstrip_protocol(p), rel=p, size=0) for p in sorted(fs.find(series.path))]
        with caplog.at_level("WARNING", logger="mcs_batch.archive.probe"):
            first = [json.loads(p)["header"] for p in probe_refs(refs[:2], storage=None, threads=2)]
            second = [json.loads(p)["header"] for p in probe_refs(refs[2:], storage=None, threads=2)]
        headers = [DicomHeader.from_dict(h) for h in first + second]
        assert all(h.bytes_read > 0 and h.has_pixel_data and not h.error_code for h in headers)
        (ok,) = [r for r in cases_from_headers(headers) if r.status == Status.OK]
        assert ok.series_uid == CT5N_SERIES and ok.shape[2] == 5
        said = [r.getMessage() for r in caplog.records if "no series-level metadata" in r.getMessage()]
        assert len(said) == 1 and "HTTP 406" in said[0]
    finally:
        proxy.shutdown()
