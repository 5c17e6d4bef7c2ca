"""DICOM SEG output: read back with highdicom and pydicom, against the sources and the NIfTI mask.

Real files, no mocks: pydicom's shipped CT series, a synthetic oblique series, an enhanced CT
multi-frame, an ultrasound image and a computed radiograph (pydicom-data). Records come from the job's own
discovery code. SEGs of each kind of source are checked with dicom3tools' `dciodvfy` (installed by
`make test`): no errors, and no warnings the source itself does not give.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pyarrow as pa
import pydicom
import pytest

from mcs_batch.config import Code, SegmentCodes
from mcs_batch.io.dicom_header import read_dicom_header
from mcs_batch.io.series import cases_from_headers
from mcs_batch.io.volume import LPS_TO_RAS
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.dicom_seg import (
    Algorithm,
    SegRefused,
    build_segmentation,
    patient_orientation,
    read_source_headers,
    redact,
    safe_reason,
    seg_bytes,
    seg_uids,
    voxels_without_source,
)
from mcs_batch.outputs.masks import nifti_bytes
from mcs_batch.outputs.schema import CASES_SCHEMA
from mcs_batch.records import CaseKind, CaseRecord, Status, instances_digest
from mcs_batch.testdata.series import oblique_orientation, write_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NEOPLASM = SegmentCodes(
    category=Code("49755003", "SCT", "Morphologically abnormal structure"), type=Code("108369006", "SCT", "Neoplasm")
)


def _data_store_file(name: str) -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data" / name


def _record(paths: list[Path]) -> CaseRecord:
    """The one ok case the job's discovery makes of these files."""
    headers = []
    for p in paths:
        with open(p, "rb") as f:
            headers.append(read_dicom_header(f, uri=p.as_uri(), rel=p.name, size=p.stat().st_size))
    records = [r for r in cases_from_headers(headers) if r.status == Status.OK]
    assert len(records) == 1
    return records[0]


def _mask(record: CaseRecord, *, seed: int = 0) -> np.ndarray:
    """uint8 [I, J, K]: a lopsided blob on some slices, others empty (so frames are omitted)."""
    i, j, k = record.shape
    rng = np.random.default_rng(seed)
    mask = (rng.random((i, j, k)) > 0.7).astype(np.uint8)
    mask[: i // 3] = 0  # asymmetric in i and j: a transposed frame would not match
    mask[:, : j // 4] = 0
    if k > 2:
        mask[:, :, 0] = 0
    return mask


def _write(tmp_path: Path, mask, record, **kw) -> tuple[Path, np.ndarray]:
    """The SEG file and the NIfTI mask as read back from its own file."""
    sources = read_source_headers(record.source_uris, storage=None)
    series_uid, sop_uid = seg_uids(record.case_id, "lesion", config_hash="c0ffee", instances=instances_digest(record))
    seg = build_segmentation(
        mask, record, sources, label="lesion", codes=kw.pop("codes", NEOPLASM), series_uid=series_uid,
        sop_uid=sop_uid, algorithm=Algorithm(parameters={"config_hash": "abc123", "sam_sha256": "ab" * 32}), **kw,
    )  # fmt: skip
    path = tmp_path / "lesion.seg.dcm"
    path.write_bytes(seg_bytes(seg))
    nifti = tmp_path / "lesion.nii.gz"
    nifti.write_bytes(nifti_bytes(mask, np.asarray(record.affine).reshape(4, 4)))
    return path, np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(nifti.read_bytes())).dataobj)


def _check_series_seg(path: Path, record: CaseRecord, nifti_mask: np.ndarray) -> None:
    """Frames reference the right instances at the right positions; the SEG decodes to the NIfTI mask."""
    sources = [pydicom.dcmread(u.removeprefix("file://"), stop_before_pixels=True) for u in record.source_uris]
    k_of_sop = {ds.SOPInstanceUID: k for ds, k in zip(sources, record.slice_index, strict=True)}
    ipp_of_sop = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in sources}
    affine_lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(record.affine).reshape(4, 4)

    raw = pydicom.dcmread(path)
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and raw.Modality == "SEG"
    assert raw.SegmentationType == "BINARY"
    assert raw.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert raw.StudyInstanceUID == sources[0].StudyInstanceUID
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
        k_of_sop
    )
    non_empty_k = sorted({int(k) for k in np.nonzero(nifti_mask.any(axis=(0, 1)))[0]})
    assert int(raw.NumberOfFrames) == len(non_empty_k)  # empty frames omitted
    framed = []
    for item in raw.PerFrameFunctionalGroupsSequence:
        sop = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, ipp_of_sop[sop], atol=1e-3)  # the source slice's position ...
        np.testing.assert_allclose(ipp, (affine_lps @ [0, 0, k_of_sop[sop], 1])[:3], atol=1e-3)  # ... and k's
        framed.append(k_of_sop[sop])
    assert sorted(framed) == non_empty_k

    seg = hd.seg.segread(path)
    uids = [ds.SOPInstanceUID for ds in sources]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    decoded = np.zeros_like(nifti_mask)
    for frame, k in zip(pixels[..., 0], record.slice_index, strict=True):
        decoded[:, :, k] = frame.T
    np.testing.assert_array_equal(decoded, nifti_mask)

    description = seg.get_segment_description(1)
    assert description.segment_label == "lesion"
    assert description.segmented_property_type == hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")
    assert description.segmented_property_category.value == "49755003"
    algorithm = description.algorithm_identification[0]
    assert algorithm.AlgorithmName == "mcs-batch" and algorithm.AlgorithmVersion
    assert "config_hash=abc123" in algorithm.AlgorithmParameters


def test_seg_of_pydicoms_real_ct_series(tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N", folder)
    record = _record(sorted(folder.iterdir()))
    assert record.kind == CaseKind.DICOM_SERIES and record.shape[2] == 5
    mask = _mask(record)
    path, nifti_mask = _write(tmp_path, mask, record)
    np.testing.assert_array_equal(nifti_mask, mask)
    _check_series_seg(path, record, nifti_mask)
    # the SEG references the patient: its patient module is the source's (by design, see README)
    source = pydicom.dcmread(record.source_uris[0].removeprefix("file://"), stop_before_pixels=True)
    assert pydicom.dcmread(path).PatientID == source.PatientID


def test_seg_of_a_synthetic_oblique_series_with_shuffled_files(tmp_path):
    paths = write_series(
        tmp_path / "oblique", rows=20, cols=14, n_slices=7, pixel_spacing=(0.6, 0.9), slice_spacing=1.7,
        orientation=oblique_orientation(25.0, 35.0), origin=(5.0, -12.0, 40.0),
    )  # fmt: skip
    record = _record(paths)
    assert record.shape == [14, 20, 7]
    assert [u.rsplit("/", 1)[1] for u in record.source_uris] != sorted(p.name for p in paths)  # files shuffled
    path, nifti_mask = _write(tmp_path, _mask(record, seed=3), record)
    _check_series_seg(path, record, nifti_mask)
    raw = pydicom.dcmread(path)
    orientation = raw.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], oblique_orientation(25.0, 35.0), atol=1e-6)
    spacing = raw.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    np.testing.assert_allclose([float(v) for v in spacing], [0.6, 0.9], atol=1e-6)


def test_seg_of_a_series_with_a_gap_has_no_frame_there(tmp_path):
    record = _record(write_series(tmp_path / "gap", n_slices=6, drop=[2]))
    assert record.shape[2] == 6 and 2 not in record.slice_index
    mask = np.ones(record.shape, np.uint8)
    path, _ = _write(tmp_path, mask, record)
    assert int(pydicom.dcmread(path).NumberOfFrames) == 5
    assert voxels_without_source(mask, record) == record.shape[0] * record.shape[1]


def test_an_empty_mask_gives_a_seg_with_every_frame_empty(tmp_path):
    record = _record(write_series(tmp_path / "s", n_slices=4))
    path, _ = _write(tmp_path, np.zeros(record.shape, np.uint8), record)
    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == 4
    uids = [pydicom.dcmread(u.removeprefix("file://")).SOPInstanceUID for u in record.source_uris]
    assert not seg.get_pixels_by_source_instance(uids, segment_numbers=[1]).any()


def test_seg_of_an_enhanced_multiframe_ct(tmp_path):
    source = tmp_path / "ect.dcm"
    shutil.copy(_data_store_file("eCT_Supplemental.dcm"), source)
    record = _record([source])
    assert record.kind == CaseKind.DICOM_MULTIFRAME and record.shape == [512, 512, 2]
    mask = np.zeros(record.shape, np.uint8)
    mask[300:340, 100:120, record.slice_index[1]] = 1  # source frame 2 only
    path, nifti_mask = _write(tmp_path, mask, record, codes=SegmentCodes())
    seg = hd.seg.segread(path)
    sop = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    frames = seg.get_pixels_by_source_frame(sop, [1, 2], segment_numbers=[1], assert_missing_frames_are_empty=True)
    for n, k in enumerate(record.slice_index):
        np.testing.assert_array_equal(frames[n, ..., 0].T, nifti_mask[:, :, k])
    raw = pydicom.dcmread(path)
    assert int(raw.NumberOfFrames) == 1
    reference = raw.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == sop and int(reference.ReferencedFrameNumber) == 2
    assert seg.get_segment_description(1).segmented_property_type.meaning == "Tissue"  # the default codes


def test_seg_of_a_2d_ultrasound_image(tmp_path):
    source = tmp_path / "us.dcm"
    shutil.copy(_data_store_file("US1_UNCR.dcm"), source)
    record = _record([source])
    assert record.kind == CaseKind.DICOM_IMAGE
    mask = np.zeros(record.shape, np.uint8)
    mask[200:260, 100:180, 0] = 1
    path, nifti_mask = _write(tmp_path, mask, record)
    seg = hd.seg.segread(path)
    sop = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance([sop], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0].T, nifti_mask[:, :, 0])
    raw = pydicom.dcmread(path)  # (values taken out first: a failing assert shows them, not the patient's header)
    frame_of_reference, orientation = raw.get("FrameOfReferenceUID"), raw.get("PatientOrientation")
    assert frame_of_reference is None and orientation == ""  # present and empty (unknown): the source's is empty


def test_seg_of_a_cr_image_takes_the_sources_patient_orientation(tmp_path):
    source = tmp_path / "cr.dcm"
    shutil.copy(_data_store_file("RG1_UNCR.dcm"), source)  # pydicom-data's computed radiograph
    record = _record([source])
    assert record.kind == CaseKind.DICOM_IMAGE and record.shape == [1841, 1955, 1]
    path, nifti_mask = _write(tmp_path, _mask(record, seed=5), record)
    raw = pydicom.dcmread(path)
    frame_of_reference, orientation = raw.get("FrameOfReferenceUID"), list(raw.get("PatientOrientation", []))
    plane_orientation = raw.SharedFunctionalGroupsSequence[0].get("PlaneOrientationSequence")
    assert frame_of_reference is None and plane_orientation is None
    assert orientation == ["L", "F"]  # the source's: rows run to the patient's left, columns to the feet
    sop = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    pixels = hd.seg.segread(path).get_pixels_by_source_instance([sop], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0].T, nifti_mask[:, :, 0])


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"PatientOrientation": ["L", "F"]}, ["L", "F"]),
        ({"PatientOrientation": ["AP", "H"]}, None),  # A and P are opposites
        ({"PatientOrientation": ["AL", "F"]}, ["AL", "F"]),  # oblique rows
        ({"PatientOrientation": ["L", "F", "A"]}, None),
        ({"PatientOrientation": ["L", "X"]}, None),
        ({"PatientOrientation": ["LL", "F"]}, None),
        ({"PatientOrientation": ""}, None),
        ({}, None),
        ({"PatientOrientation": ["L", "F"], "AnatomicalOrientationType": "QUADRUPED"}, None),
        ({"PatientOrientation": ["L", "F"], "AnatomicalOrientationType": "BIPED"}, ["L", "F"]),
    ],
    ids=["LF", "opposites", "oblique", "three", "not_a_direction", "repeated", "empty", "absent", "quadruped", "biped"],
)
def test_patient_orientation_is_the_sources_when_it_is_a_bipeds_pair(header, expected):
    source = pydicom.Dataset()
    for keyword, value in header.items():
        setattr(source, keyword, value)
    assert patient_orientation(source) == expected


def test_a_multiframe_without_positions_is_refused(tmp_path):
    source = tmp_path / "mr.dcm"
    shutil.copy(_data_store_file("emri_small.dcm"), source)
    record = _record([source])
    with pytest.raises(SegRefused, match="per-frame positions"):
        _write(tmp_path, np.ones(record.shape, np.uint8), record)


def test_error_reasons_carry_no_patient_values(tmp_path):
    source = tmp_path / "ct.dcm"
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", source)
    header = read_source_headers([source.as_uri()], storage=None)[0]
    name, pid = str(header.PatientName), str(header.PatientID)
    reason = safe_reason(ValueError(f"patient {name} ({pid}) and {name.split('^')[0]} differ"), [header])
    assert name not in reason and pid not in reason and name.split("^")[0] not in reason
    assert reason.startswith("ValueError: patient <redacted>")
    assert redact(f"PN [1] = <{pid}>", [header]) == "PN [1] = <<redacted>>"  # as the dciodvfy test prints reports


def test_a_cases_table_without_seg_uri_reads_it_as_null_and_takes_it_on(tmp_path):
    from deltalake import write_deltalake

    from mcs_batch.outputs.catalog import CASES

    before = pa.schema([f for f in CASES.arrow_schema() if f.name != "seg_uri"])  # a table of rows without SEGs
    row = {"case_id": "c1", "target": "lesion", "status": "ok", "mask_uri": "file:///m.nii.gz", "run_id": "r1"}
    write_deltalake(str(tmp_path / "catalog" / "cases"), pa.Table.from_pylist([row], schema=before))
    catalog = Catalog(str(tmp_path))
    assert catalog.cases().to_pylist() == [{**{name: None for name in CASES_SCHEMA.names}, **row}]
    catalog.commit("r2", 0, [{**row, "case_id": "c2", "run_id": "r2", "seg_uri": "file:///m.seg.dcm"}], [])
    rows = {r["case_id"]: r["seg_uri"] for r in catalog.cases(["case_id", "seg_uri"]).to_pylist()}
    assert rows == {"c1": None, "c2": "file:///m.seg.dcm"}


def _ct_series(folder: Path) -> list[Path]:
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N", folder)
    return sorted(folder.iterdir())


def _one_file(name: str, *, drop: tuple[str, ...] = ()):
    def copy(folder: Path) -> list[Path]:
        folder.mkdir()
        ds = pydicom.dcmread(_data_store_file(name))
        for keyword in drop:
            delattr(ds, keyword)
        ds.save_as(folder / name)
        return [folder / name]

    return copy


# Sources of each kind the writer handles: test id -> maker of the source files in a folder.
CONFORMANCE_SOURCES = {
    "ct_series": _ct_series,  # pydicom's real CT series, 5 slices
    "enhanced_ct_multiframe": _one_file("eCT_Supplemental.dcm"),
    "cr_image": _one_file("RG1_UNCR.dcm"),  # Patient Orientation ["L", "F"], no frame of reference
    "cr_image_without_patient_orientation": _one_file("RG1_UNCR.dcm", drop=("PatientOrientation",)),
    "us_image": _one_file("US1_UNCR.dcm"),  # Patient Orientation empty, no frame of reference
}


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's report on one file, line by line (Error / Warning lines, and the IOD it checked against)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail(
            "dciodvfy not found: it is Debian's dicom3tools, which `make test` installs (the Makefile's sysdeps "
            "target); or: apt-get install dicom3tools"
        )
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300, check=False)
    return [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]


def _decoded(path: Path, record: CaseRecord) -> np.ndarray:
    """uint8 [I, J, K]: the SEG's segment read back with highdicom, by source reference, onto the stored grid."""
    seg = hd.seg.segread(path)
    sops = [
        pydicom.dcmread(u.removeprefix("file://"), stop_before_pixels=True).SOPInstanceUID for u in record.source_uris
    ]
    if record.kind == CaseKind.DICOM_MULTIFRAME:
        numbers = list(range(1, len(record.slice_index) + 1))
        frames = seg.get_pixels_by_source_frame(
            sops[0], numbers, segment_numbers=[1], assert_missing_frames_are_empty=True
        )
    else:
        frames = seg.get_pixels_by_source_instance(sops, segment_numbers=[1], assert_missing_frames_are_empty=True)
    decoded = np.zeros(record.shape, np.uint8)
    for frame, k in zip(
        frames[..., 0], [0] if record.kind == CaseKind.DICOM_IMAGE else record.slice_index, strict=True
    ):
        decoded[:, :, k] = frame.T
    return decoded


@pytest.mark.parametrize("source", list(CONFORMANCE_SOURCES))
def test_seg_passes_dciodvfy(tmp_path, source):
    """dciodvfy finds no error in the SEG, and every warning it gives is one it gives on the sources too (a
    value copied from them, such as a zero patient weight): none is the writer's. highdicom reads the SEG
    back equal to the mask."""
    paths = CONFORMANCE_SOURCES[source](tmp_path / "source")
    record = _record(paths)
    mask = _mask(record, seed=7)
    assert mask.any()
    path, nifti_mask = _write(tmp_path, mask, record)
    np.testing.assert_array_equal(_decoded(path, record), nifti_mask)

    report = _dciodvfy(path)
    headers = read_source_headers(record.source_uris, storage=None)  # to redact the report's patient values
    print(f"dciodvfy on the SEG of {source}:", *[redact(line, headers) for line in report], sep="\n  ")
    assert "Segmentation" in report  # checked against the Segmentation IOD
    errors = [redact(line, headers) for line in report if line.startswith("Error")]
    assert errors == []
    inherited = {line for p in paths for line in _dciodvfy(p) if line.startswith("Warning")}
    own = [redact(line, headers) for line in report if line.startswith("Warning") and line not in inherited]
    assert own == []


def test_a_seg_of_pacs_sources_from_their_metadata_equals_the_seg_of_their_files(orthanc, tmp_path: Path):
    """Sources in a PACS (a real Orthanc): the SEG is built from their series metadata (no instance
    fetched again) and is the SEG their files give: same frames, same references, same patient."""
    import json

    from mcs_batch.archive.listing import top_prefixes
    from mcs_batch.archive.probe import probe_refs
    from mcs_batch.io.dicom_header import DicomHeader
    from mcs_batch.io.discover import ObjectRef
    from mcs_batch.io.storage import filesystem_for

    ct = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
    orthanc.upload(sorted(ct.iterdir()))
    (series,) = top_prefixes([orthanc.uri()], storage=None)
    fs, _ = filesystem_for(orthanc.uri())
    refs = [ObjectRef(uri=fs.unstrip_protocol(p), rel=p, size=0) for p in sorted(fs.find(series.path))]
    headers = [DicomHeader.from_dict(json.loads(p)["header"]) for p in probe_refs(refs, storage=None, threads=2)]
    (web,) = [r for r in cases_from_headers(headers) if r.status == Status.OK]
    local = _record(sorted(ct.iterdir()))
    mask = _mask(local)
    sources = read_source_headers(web.source_uris, storage=None)
    assert all("PixelData" not in ds for ds in sources)
    seg = build_segmentation(mask, web, sources, label="lesion", codes=NEOPLASM, series_uid="1.2.3", sop_uid="1.2.3.4",
                             algorithm=Algorithm(parameters={"config_hash": "abc123"}))  # fmt: skip
    (web_dir := tmp_path / "web").mkdir()
    path = web_dir / "lesion.seg.dcm"
    path.write_bytes(seg_bytes(seg))
    back = hd.seg.segread(path)
    file_path, nifti = _write(tmp_path, mask, local)
    from_files = hd.seg.segread(file_path)
    assert back.PatientID == from_files.PatientID and back.StudyInstanceUID == from_files.StudyInstanceUID
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == local.series_uid
    uids = [u.rsplit("/", 1)[-1] for u in web.source_uris]
    pixels = back.get_pixels_by_source_instance(uids, segment_numbers=[1])
    np.testing.assert_array_equal(np.transpose(pixels[..., 0], (2, 1, 0)), nifti)
