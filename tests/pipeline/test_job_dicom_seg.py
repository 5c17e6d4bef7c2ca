"""outputs.dicom_seg in a real job (local Ray, tiny models): a SEG beside each DICOM case's NIfTI, listed
in the catalog as seg_uri; no patient data in the catalog or the run record. The SEG's content is tested
on its own in tests/outputs/test_dicom_seg.py."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from tests.pipeline.test_job import QUIET, job

pytestmark = pytest.mark.usefixtures("ray_local")
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def test_job_writes_a_seg_per_dicom_case_and_lists_it(tmp_path: Path):
    cohort = tmp_path / "cohort"
    shutil.copytree(CT5N, cohort / "real_ct")  # pydicom's real CT series (with a patient module)
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))).save(cohort / "image.png")  # no SEG
    out = tmp_path / "out"
    cfg = job([cohort], out, tmp_path, "outputs.dicom_seg=true", "targets.0.dicom_seg.type.value=108369006",
              "targets.0.dicom_seg.type.meaning=Neoplasm")  # fmt: skip
    summary = run_job(cfg, **QUIET)

    catalog = Catalog(str(out))
    rows = catalog.cases().to_pylist()
    assert sorted(r["kind"] for r in rows) == ["dicom_series", "image"]
    assert all(r["status"] == "ok" for r in rows)
    for row in rows:
        if row["kind"] == "image":
            assert row["seg_uri"] is None and not any(w.startswith("dicom_seg") for w in row["warnings"])
            continue
        assert row["seg_uri"] == (out / "masks" / row["case_id"] / "lesion.seg.dcm").resolve().as_uri()
        seg = hd.seg.segread(row["seg_uri"].removeprefix("file://"))
        sources = [pydicom.dcmread(u.removeprefix("file://"), stop_before_pixels=True) for u in row["source_uris"]]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == row["series_uid"]
        assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        description = seg.get_segment_description(1)
        assert description.segment_label == "lesion" and description.segmented_property_type.meaning == "Neoplasm"
        assert f"config_hash={cfg.hash()}" in description.algorithm_identification[0].AlgorithmParameters
        nifti = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(Path(row["mask_uri"][7:]).read_bytes())).dataobj)
        pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], segment_numbers=[1])
        assert row["shape"][2] == len(sources)  # no gaps in these series: source n is slice k = n
        np.testing.assert_array_equal(np.transpose(pixels[..., 0], (2, 1, 0)), nifti)

    patient = pydicom.dcmread(next(CT5N.iterdir()), stop_before_pixels=True)
    written = (out / "runs" / f"{summary.run_id}.json").read_text()
    written += json.dumps([catalog.cases().to_pylist(), catalog.slices().to_pylist()], default=str)
    for value in (str(patient.PatientName), str(patient.PatientID), str(patient.get("PatientBirthDate") or "")):
        assert not value or value not in written
