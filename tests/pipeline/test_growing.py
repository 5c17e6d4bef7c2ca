"""A series committed while its files were still arriving is completed by a later run: its rows and
mask are replaced (the new rows replace the old in the commit's merge), never two rows for one pair."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from mcs_batch.testdata.series import write_series
from tests.outputs.test_commit_protocol import read_everywhere
from tests.pipeline.test_identity import mask_shape
from tests.pipeline.test_job import QUIET, job

pytestmark = pytest.mark.usefixtures("ray_local")


def series_in_two_halves(folder: Path) -> tuple[list[Path], list[Path]]:
    """A 30-slice series: the files of its 20 lowest slices, then of the 10 above them."""
    paths = write_series(folder, rows=24, cols=24, n_slices=30, slice_spacing=2.0, series_seed="growing")
    height = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in paths}
    ordered = sorted(paths, key=height.get)
    return ordered[:20], ordered[20:]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_series_committed_with_20_of_30_files_is_completed_by_the_next_run(tmp_path: Path, where, request):
    first_files, late_files = series_in_two_halves(tmp_path / "made")
    archive = tmp_path / "cohort"
    (archive / "ct").mkdir(parents=True)
    image = np.random.default_rng(2).integers(0, 40, (40, 48), dtype=np.uint8)
    image[8:24, 10:30] = 230
    Image.fromarray(image).save(archive / "img.png")
    storage, inputs, out = None, [archive], str(tmp_path / "out")
    if where == "s3":
        bucket, fs = request.getfixturevalue("s3_bucket")
        server = request.getfixturevalue("s3_server")
        storage = StorageOptions(endpoint_url=server["endpoint_url"], key=server["key"], secret=server["secret"])
        inputs, out = [f"s3://{bucket}/cohort"], f"s3://{bucket}/out"

    def arrive(files: list[Path]) -> None:
        for path in files:
            shutil.copy(path, archive / "ct" / path.name)
            if where == "s3":
                fs.put_file(str(path), f"{bucket}/cohort/ct/{path.name}")
        if where == "s3":
            fs.put_file(str(archive / "img.png"), f"{bucket}/cohort/img.png")

    arrive(first_files)
    first = run_job(job(inputs, out, tmp_path), storage=storage, **QUIET)
    assert first.by_status == {"ok": 2} and first.grown_series == 0
    before = {r["kind"]: r for r in Catalog(out, storage=storage).cases().to_pylist()}
    assert before["dicom_series"]["shape"] == [24, 24, 20] and len(before["dicom_series"]["source_uris"]) == 20

    arrive(late_files)  # the rest of the series arrives
    second = run_job(job(inputs, out, tmp_path), storage=storage, **QUIET)
    assert second.grown_series == 1 and second.cases == 1 and second.by_status == {"ok": 1}
    catalog = Catalog(out, storage=storage)
    rows = catalog.cases().to_pylist()
    assert len(rows) == 2 and len({(r["case_id"], r["target"]) for r in rows}) == 2  # superseded, not added
    after = {r["kind"]: r for r in rows}
    series = after["dicom_series"]
    assert series["case_id"] == before["dicom_series"]["case_id"]  # the same case, a new version
    assert series["shape"] == [24, 24, 30] and len(series["source_uris"]) == 30
    assert series["run_id"] == second.run_id and series["instances"] != before["dicom_series"]["instances"]
    assert mask_shape(series["mask_uri"], storage) == (24, 24, 30)
    assert after["image"]["run_id"] == first.run_id  # the other case is untouched
    slices = catalog.slices(["case_id", "slice_index"]).to_pylist()
    ks = sorted(s["slice_index"] for s in slices if s["case_id"] == series["case_id"])
    assert ks == list(range(30))  # the first run's 20 slice rows are not the catalog's any more, none twice
    if where == "local":
        for reader, (cases, slice_keys) in read_everywhere(out, None).items():
            assert len(cases) == len(set(cases)) == 2 and len(slice_keys) == len(set(slice_keys)) == 31, reader
        third = run_job(job(inputs, out, tmp_path), storage=storage, **QUIET)
        assert third.cases == 0 and third.grown_series == 0  # complete now: nothing to redo
