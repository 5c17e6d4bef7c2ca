"""Streaming at the archive's scale: work in small blocks with overlapping stages, the first cases
committed while the scan is still reading, and a nightly re-run that reads only new headers."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcs_batch.config import load_config
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from mcs_batch.testdata.series import write_series

pytestmark = pytest.mark.usefixtures("ray_local")
QUIET = {"progress": lambda message: None}


def images(folder: Path, n: int, start: int = 0, size: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        img = rng.integers(0, 50, (size, size), dtype=np.uint8)
        img[8:24, 10:30] = 220
        Image.fromarray(img).save(folder / f"img{i:04d}.png")


def job(inputs, out, tmp_path: Path, *extra: str):
    cache = f"models.cache_dir={tmp_path.parent / 'model-cache'}"
    return load_config(preset="tiny", prompts=["a bright lesion"], target="lesion", inputs=[str(i) for i in inputs],
                       out=str(out), overrides=[cache, *extra])  # fmt: skip


def run_record(out, run_id: str, storage=None) -> dict:
    catalog = Catalog(str(out), storage=storage)
    with catalog.fs.open(catalog.path("runs", f"{run_id}.json"), "rb") as f:
        return json.loads(f.read())


def test_a_nightly_rerun_reads_headers_only_of_new_objects(tmp_path: Path):
    archive, out = tmp_path / "archive", tmp_path / "out"
    images(archive / "day1", 12)
    write_series(archive / "day1" / "ct", rows=16, cols=16, n_slices=6, series_seed="night")
    first = run_job(job([archive], out, tmp_path), **QUIET)
    assert first.cases == 13
    images(archive / "day2", 2, start=100)  # 2 new objects: 10% of 18
    second = run_job(job([archive], out, tmp_path), **QUIET)
    assert sum(run_record(out, first.run_id)["assembled"].values()) == 13
    run = run_record(out, second.run_id)
    assert run["scan"]["objects"] == 20 and run["scan"]["probed"] == 2  # header reads: the new objects only
    assert run["scan"]["cached"] == 18 and run["listing"]["indexed"] == 18
    assert second.cases == 2 and second.skipped_committed == 13
    pairs = [(r["case_id"], r["target"]) for r in Catalog(str(out)).cases(["case_id", "target"]).to_pylist()]
    assert len(pairs) == len(set(pairs)) == 15
    third = run_job(job([archive], out, tmp_path), **QUIET)
    assert run_record(out, third.run_id)["scan"]["probed"] == 0 and third.cases == 0


def test_blocks_are_small_and_stages_overlap(tmp_path: Path):
    archive, out = tmp_path / "archive", tmp_path / "out"
    images(archive, 40)
    summary = run_job(job([archive], out, tmp_path, "resources.block_rows=8"), **QUIET)
    run = run_record(out, summary.run_id)
    ops = {op["name"]: op for op in run["ray_data"]["operators"]}
    # the re-blocking runs inside the decoding tasks (cluster.rechunk), not as a stage of its own
    load = next((op for name, op in ops.items() if "load_units" in name and "StreamingRepartition" in name), None)
    assert load is not None, list(ops)
    # the wave's 40 images (one block from the grouper) are decoded by several tasks, one per load unit
    # of at most 32 rows (a case row and its slice per image: 16 images), not by one task
    assert next(op for name, op in ops.items() if "plan_units" in name)["tasks"] == 1
    assert load["tasks"] == 3, load
    # on CPU one actor pool runs both models (resources.models_together: auto)
    assert run["resources"]["together"] and run["resources"]["models"]["max_actors"] == 2  # auto, 2 CPUs
    models = next(op for name, op in ops.items() if "Together" in name)
    assert not any("SamStage" in name or "SaliencyStage" in name for name in ops)
    assert models["tasks"] >= 10  # 80 rows (40 cases, 40 slices) in blocks of 8: many tasks, not one
    stages = {k: {e: datetime.fromisoformat(t) for e, t in v.items()} for k, v in run["timeline"]["stages"].items()}
    assert stages["sam"]["first"] < stages["saliency"]["last"]  # SAM at work while M2IB still had blocks
    assert datetime.fromisoformat(run["timeline"]["first_commit_at"]) < stages["sam"]["last"]  # commits stream
    model_actors = [a for a in run["actors"] if a["stage"] in ("saliency", "sam")]
    by_stage = {stage: sorted(a["pid"] for a in model_actors if a["stage"] == stage) for stage in ("saliency", "sam")}
    assert len(by_stage["sam"]) == 2 and by_stage["saliency"] == by_stage["sam"]  # each process holds both models
    assert any(a["stage"] == "grouper" for a in run["actors"])
    # a case wholly inside one block (here every image: its record row and its slice) is assembled in
    # the block's parts task, with no staging part and no assembly task; each case exactly once
    assembled = run["assembled"]
    assert assembled["in_blocks"] + assembled["by_tasks"] == 40 and assembled["in_blocks"] >= 30, assembled
    assert not any((out / "staging").rglob("*.parquet"))


def test_two_model_pools_when_asked(tmp_path: Path):
    archive, out = tmp_path / "archive", tmp_path / "out"
    images(archive, 6)
    summary = run_job(job([archive], out, tmp_path, "resources.models_together=false"), **QUIET)
    assert summary.by_status == {"ok": 6}
    run = run_record(out, summary.run_id)
    names = [op["name"] for op in run["ray_data"]["operators"]]
    assert any("SaliencyStage" in n for n in names) and any("SamStage" in n for n in names), names
    assert not any("Together" in n for n in names) and run["resources"]["models"] is None
    pids = {stage: {a["pid"] for a in run["actors"] if a["stage"] == stage} for stage in ("saliency", "sam")}
    assert pids["saliency"] and pids["sam"] and not pids["saliency"] & pids["sam"]  # separate processes


# About 100 s (half of it the 5,000 uploads to the S3 server): CI runs it, as the streaming issue asks.
# The 4,994 notes have nothing to segment: the grouper hands them to the driver through the board, so
# they never queue before the images for the model actors.
def test_the_first_case_is_committed_before_the_scan_of_5000_objects_ends(tmp_path: Path, s3_bucket, s3_server):
    bucket, fs = s3_bucket
    local = tmp_path / "archive"
    images(local / "a-images", 6, size=32)
    notes = local / "b-notes"
    notes.mkdir()
    for i in range(4994):  # the rest of the archive: objects that are not images (reports, exports, ...)
        (notes / f"note{i:05d}.txt").write_text(f"report {i}\n")
    fs.put(str(local) + "/", f"{bucket}/archive/", recursive=True)
    assert len(fs.find(f"{bucket}/archive")) == 5000
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    cfg = job([f"s3://{bucket}/archive"], f"s3://{bucket}/out", tmp_path, "inputs.wave_objects=500",
              "outputs.catalog_flush_cases=256", "outputs.catalog_flush_seconds=2")  # fmt: skip
    # commits of up to 256 cases every 2 s, as a job commits (not one S3 commit per 2 of the 4,994 notes)
    summary = run_job(cfg, storage=storage, **QUIET)
    run = run_record(f"s3://{bucket}/out", summary.run_id, storage)
    assert run["scan"]["objects"] == 5000 and summary.by_status == {"ok": 6, "skipped": 4994}
    scan_done = datetime.fromisoformat(run["timeline"]["scan_finished_at"])
    catalog = Catalog(f"s3://{bucket}/out", storage=storage)
    first_ok = None
    for row in catalog.cases(["status", "committed_at"]).to_pylist():
        if row["status"] == "ok":
            t = datetime.fromisoformat(row["committed_at"])
            first_ok = t if first_ok is None else min(first_ok, t)
    assert first_ok is not None and first_ok < scan_done, (first_ok, run["timeline"], run["listing"])  # mid-scan
