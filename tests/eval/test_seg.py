"""DICOM SEG ground truth: a SEG written here for a synthetic series (referencing it by
SeriesInstanceUID and SOPInstanceUIDs), and pydicom's shipped liver_1frame.dcm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mcs_batch.eval.datasets import list_truth
from mcs_batch.eval.evaluate import evaluate
from mcs_batch.eval.truth import SEG_SOP_CLASS, TruthError, read_seg, seg_mask, seg_references
from mcs_batch.io.volume import LPS_TO_RAS
from mcs_batch.scan import discover_cases
from mcs_batch.testdata.series import synthetic_uid, write_series
from tests.eval.cohort import FakeRun


def item(**values) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def write_seg(path: Path, segments: dict[int, tuple[str, np.ndarray]], affine: np.ndarray, *, series_uid: str,
              sop_uids: list[str], orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)) -> Path:  # fmt: skip
    """A binary SEG with one frame per (segment, non-empty slice), positions from the volume's affine."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    frames, per_frame = [], []
    for number, (_, mask) in sorted(segments.items()):
        for k in range(mask.shape[2]):
            if not mask[:, :, k].any():
                continue
            lps = (np.linalg.inv(LPS_TO_RAS) @ affine @ [0, 0, k, 1])[:3]
            frames.append(mask[:, :, k].T)  # [rows = j, columns = i]
            source = item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID=sop_uids[k])
            per_frame.append(item(
                DerivationImageSequence=Sequence([item(SourceImageSequence=Sequence([source]))]),
                FrameContentSequence=Sequence([item(DimensionIndexValues=[number, k + 1])]),
                PlanePositionSequence=Sequence([item(ImagePositionPatient=[f"{v:.6f}" for v in lps])]),
                SegmentIdentificationSequence=Sequence([item(ReferencedSegmentNumber=number)]),
            ))  # fmt: skip
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SEG_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.SeriesInstanceUID = SEG_SOP_CLASS, "SEG", generate_uid()
    ds.SegmentationType = "BINARY"
    ds.ReferencedSeriesSequence = Sequence([item(
        SeriesInstanceUID=series_uid,
        ReferencedInstanceSequence=Sequence([item(ReferencedSOPInstanceUID=u) for u in sop_uids]),
    )])  # fmt: skip
    ds.SegmentSequence = Sequence([item(SegmentNumber=n, SegmentLabel=label) for n, (label, _) in segments.items()])
    ds.SharedFunctionalGroupsSequence = Sequence([item(
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=list(orientation))]),
        PixelMeasuresSequence=Sequence([item(PixelSpacing=[float(spacing[1]), float(spacing[0])],
                                             SliceThickness=float(spacing[2]))]),
    )])  # fmt: skip
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    stack = np.stack(frames).astype(np.uint8)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(stack)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture
def series(tmp_path: Path):
    """A synthetic CT series (5 slices of 24 x 20) and a known blob mask in its voxel grid."""
    write_series(tmp_path / "in" / "ct", rows=20, cols=24, n_slices=5, series_seed="seg-test")
    (record,) = discover_cases([str(tmp_path / "in")])
    affine = np.asarray(record.affine).reshape(4, 4)
    blob = np.zeros(tuple(record.shape), bool)
    blob[6:15, 5:12, 1:4] = True
    body = np.zeros_like(blob)
    body[2:20, 2:18, :] = True
    sop_uids = [synthetic_uid(f"seg-test/slice/{k}/") for k in range(5)]
    return record, affine, blob, body, sop_uids


def test_seg_of_a_synthetic_series_decodes_onto_its_grid(tmp_path: Path, series):
    record, affine, blob, body, sop_uids = series
    path = write_seg(tmp_path / "truth" / "ct_seg.dcm", {1: ("Lesion", blob), 2: ("Body", body)}, affine,
                     series_uid=record.series_uid, sop_uids=sop_uids)  # fmt: skip
    ds = read_seg(path.read_bytes(), uri=str(path))
    assert seg_references(ds) == ([record.series_uid], sop_uids)
    shape = tuple(record.shape)
    np.testing.assert_array_equal(seg_mask(ds, uri="x", shape=shape, affine=affine, label="lesion"), blob)
    np.testing.assert_array_equal(seg_mask(ds, uri="x", shape=shape, affine=affine, label=2), body)
    np.testing.assert_array_equal(seg_mask(ds, uri="x", shape=shape, affine=affine), blob | body)  # all segments
    with pytest.raises(TruthError, match="no segment 'liver'"):
        seg_mask(ds, uri="x", shape=shape, affine=affine, label="liver")
    coarser = affine.copy()
    coarser[:3, :2] *= 2
    with pytest.raises(TruthError, match="voxel grid"):
        seg_mask(ds, uri="x", shape=shape, affine=coarser)


def test_evaluate_matches_a_seg_to_its_series_by_uid(tmp_path: Path, series):
    record, affine, blob, _, sop_uids = series
    truth = tmp_path / "truth"
    write_seg(truth / "anything.dcm", {1: ("Lesion", blob)}, affine, series_uid=record.series_uid, sop_uids=sop_uids)
    run = FakeRun(tmp_path / "out")
    paths = [k.split("/", 1)[1] for k in record.source_keys]  # in the input: FakeRun adds its name
    run.volume(record.case_id, paths, blob, affine, series_uid=record.series_uid)
    run.volume("f" * 24, ["other/x.dcm", "other/y.dcm"], blob, affine, series_uid="1.2.3.4")
    out = run.commit()
    result = evaluate(out, list_truth(str(truth)).items, truth_root=str(truth), dataset="seg")
    (row,) = result.rows
    assert (row["case_id"], row["matched_by"], row["status"], row["dice"], row["nsd"]) == (
        record.case_id, "series_uid", "ok", 1.0, 1.0)  # fmt: skip
    assert row["unit"] == "mm" and row["ndim"] == 3 and result.unmatched_predictions == 1


def test_pydicom_liver_seg_with_mm_tolerance(tmp_path: Path):
    """liver_1frame.dcm: one 512 x 512 frame (0.8105 mm pixels) of a CT series that is not shipped;
    its prediction case is built from the SEG's own geometry. A 2-column shift is 1.62 mm: within 2 mm."""
    path = Path(get_testdata_file("liver_1frame.dcm"))
    ds = read_seg(path.read_bytes(), uri=str(path))
    (series_uid,), sops = seg_references(ds)
    assert series_uid == "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1" and len(sops) == 3
    position = [float(v) for v in ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 3] = (0.810547, 0, 0), (0, 0.810547, 0), position
    affine = LPS_TO_RAS @ lps
    liver = seg_mask(ds, uri=str(path), shape=(512, 512, 1), affine=affine)
    assert liver.sum() == 36233
    np.testing.assert_array_equal(liver[:, :, 0], ds.pixel_array.T > 0)

    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "liver.dcm").write_bytes(path.read_bytes())
    run = FakeRun(tmp_path / "out", target="liver")
    run.volume("a" * 24, ["ct/1.dcm"], np.roll(liver, 2, axis=0), affine, series_uid=series_uid)
    out = run.commit()
    (row,) = evaluate(out, list_truth(str(truth)).items, truth_root=str(truth), dataset="liver").rows
    assert (row["status"], row["ndim"], row["unit"]) == ("ok", 2, "mm")
    assert row["nsd"] == 1.0 and row["hd95"] == pytest.approx(2 * 0.810547, abs=1e-4)
    assert 0.9 < row["dice"] < 1.0
