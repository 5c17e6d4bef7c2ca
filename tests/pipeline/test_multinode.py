"""The job on a multi-node cluster declaring GPUs: model actors on every node, one per GPU at least, each
reporting the GPU ids Ray gave it; and a worker node removed mid-run: the job still completes, every
(case, target) once, every ok mask readable."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.testdata.series import write_series
from tests.pipeline.multinode import RESULT

REPO = Path(__file__).resolve().parents[2]


IMAGES = 30


def cohort(folder: Path) -> Path:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    for i in range(IMAGES):
        img = rng.integers(0, 40, (40, 48), dtype=np.uint8)
        img[10:25, 12 + i % 10 : 30 + i % 10] = 230
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    write_series(folder / "ct", rows=24, cols=24, n_slices=6, series_seed="multinode")
    return folder


def run_cluster(tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    inputs, out = cohort(tmp_path / "in"), tmp_path / "out"
    tmp = Path("/tmp") / f"mcsb-{os.getpid()}-{tmp_path.name[-12:]}"  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cache = tmp_path.parent / "model-cache"
    cmd = [sys.executable, "-m", "tests.pipeline.multinode", str(inputs), str(out), str(cache), str(tmp), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT))
    return json.loads(line.removeprefix(RESULT)), out


def check_outputs(out: Path) -> None:
    catalog = Catalog(str(out))
    rows = catalog.cases().to_pylist()
    pairs = [(r["case_id"], r["target"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == IMAGES + 1  # the images and the series, each exactly once
    assert {r["status"] for r in rows} == {"ok"}
    slices = [(s["case_id"], s["slice_index"]) for s in catalog.slices(["case_id", "slice_index"]).to_pylist()]
    assert len(slices) == len(set(slices)) == IMAGES + 6
    for r in rows:
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(Path(r["mask_uri"].removeprefix("file://")).read_bytes()))
        assert mask.shape == tuple(r["shape"]) and int(np.asarray(mask.dataobj).sum()) == r["mask_voxels"]


def test_model_actors_take_every_declared_gpu_on_every_node(tmp_path: Path):
    result, out = run_cluster(tmp_path)
    assert result["by_status"] == {"ok": IMAGES + 1} and not result["aborted"]
    run = json.loads((out / "runs" / f"{result['run_id']}.json").read_text())
    assert run["resources"]["gpus"] == 4 and run["resources"]["cluster"]["gpu_nodes"] == 2
    actors = [a for a in run["actors"] if a["stage"] in ("saliency", "sam")]
    for stage in ("saliency", "sam"):
        mine = [a for a in actors if a["stage"] == stage]
        assert len(mine) >= 4  # at least one per declared GPU
        assert {a["node"] for a in mine} == set(result["workers"])  # on every GPU node
    assert all(a["gpu_ids"] and a["device"] == "cpu" and not a["cuda_available"] for a in actors)
    gpu_slots = [(a["node"], g) for a in actors for g in a["gpu_ids"]]
    assert len(set(gpu_slots)) == 4  # the 4 declared GPUs, each shared by one M2IB and one SAM actor
    fake = [line for line in result["progress"] if "CUDA is not available" in line]
    assert len(fake) == 1  # said once
    check_outputs(out)


def test_a_worker_node_removed_mid_run_loses_and_duplicates_nothing(tmp_path: Path):
    result, out = run_cluster(tmp_path, "--remove-node")
    assert result["removed"] == [result["workers"][1]]
    assert result["by_status"] == {"ok": IMAGES + 1} and not result["aborted"]
    run = json.loads((out / "runs" / f"{result['run_id']}.json").read_text())
    assert run["status"] == "succeeded"
    lost = [a for a in run["attempts"] if a.get("lost_nodes")]
    assert [a["lost_nodes"] for a in lost] == [[result["workers"][1]]], run["attempts"]  # noticed, planned again
    assert run["attempts"][-1]["resources"]["gpus"] == 2  # on the GPUs that remained
    assert any("left the cluster" in line for line in result["progress"])
    check_outputs(out)
