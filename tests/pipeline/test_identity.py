"""Case identity across inputs: ids that never collide within an archive, stable when it moves.

Keys (and so the ids of files that are not DICOM) start with the input's own folder name, so two
sites laid out alike stay apart; inputs that would still collide are refused before anything runs.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from mcs_batch.scan import discover_cases
from tests.pipeline.test_job import QUIET, job, pairs

pytestmark = pytest.mark.usefixtures("ray_local")


def two_sites(root: Path) -> tuple[Path, Path]:
    """siteA/img.png and siteB/img.png: the same relative path, different pixels (and sizes)."""
    rng = np.random.default_rng(3)
    for site, (height, width) in (("siteA", (40, 56)), ("siteB", (64, 48))):
        image = rng.integers(0, 40, (height, width), dtype=np.uint8)
        image[10:30, 12:30] = 230
        (root / site).mkdir(parents=True)
        Image.fromarray(image).save(root / site / "img.png")
    return root / "siteA", root / "siteB"


def mask_shape(uri: str, storage: StorageOptions | None) -> tuple[int, ...]:
    from mcs_batch.io.storage import filesystem_for

    fs, path = filesystem_for(uri, storage)
    with fs.open(path, "rb") as f:
        return nib.Nifti1Image.from_bytes(gzip.decompress(f.read())).shape


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_inputs_with_identical_relative_paths_are_two_cases(tmp_path: Path, where, request):
    site_a, site_b = two_sites(tmp_path / "sites")
    storage = None
    inputs, out = [site_a, site_b], str(tmp_path / "out")
    if where == "s3":
        bucket, fs = request.getfixturevalue("s3_bucket")
        server = request.getfixturevalue("s3_server")
        storage = StorageOptions(endpoint_url=server["endpoint_url"], key=server["key"], secret=server["secret"])
        for site in (site_a, site_b):
            fs.put_file(str(site / "img.png"), f"{bucket}/{site.name}/img.png")
        inputs, out = [f"s3://{bucket}/siteA", f"s3://{bucket}/siteB"], f"s3://{bucket}/out"
    summary = run_job(job(inputs, out, tmp_path), storage=storage, **QUIET)
    assert summary.by_status == {"ok": 2}

    rows = Catalog(out, storage=storage).cases().to_pylist()
    assert len(rows) == len({r["case_id"] for r in rows}) == 2 and len(pairs(Catalog(out, storage=storage))) == 2
    by_key = {r["source_keys"][0]: r for r in rows}
    assert set(by_key) == {"siteA/img.png", "siteB/img.png"}
    for key, size in (("siteA/img.png", (56, 40, 1)), ("siteB/img.png", (48, 64, 1))):
        row = by_key[key]
        assert row["source_uris"][0].endswith(key) and row["shape"] == list(size)
        assert mask_shape(row["mask_uri"], storage) == size  # each mask from its own image, nothing mixed
    if where == "local":  # a site moved elsewhere keeps its ids
        moved = tmp_path / "elsewhere" / "siteA"
        shutil.copytree(site_a, moved)
        assert discover_cases([str(moved)])[0].case_id == by_key["siteA/img.png"]["case_id"]


def test_inputs_that_would_collide_are_refused_before_the_run(tmp_path: Path):
    site_a, _ = two_sites(tmp_path / "sites")
    twin = tmp_path / "other" / "siteA"  # another folder with the same name: keys siteA/... twice
    shutil.copytree(site_a, twin)
    with pytest.raises(ConfigError, match=r"inputs .*siteA and .*siteA are both named 'siteA'"):
        run_job(job([site_a, twin], tmp_path / "out", tmp_path), **QUIET)
    with pytest.raises(ConfigError, match=r"input .*siteA lies inside input .*sites"):
        run_job(job([tmp_path / "sites", site_a], tmp_path / "out", tmp_path), **QUIET)
    with pytest.raises(ConfigError, match="both named 'siteA'"):  # a file input in a folder named alike
        discover_cases([str(site_a), str(twin / "img.png")])
    assert not (tmp_path / "out" / "runs").exists()  # refused before any run record
    summary = run_job(job([site_a, f"{site_a}/"], tmp_path / "out", tmp_path), **QUIET)  # one input given twice
    assert summary.by_status == {"ok": 1}
