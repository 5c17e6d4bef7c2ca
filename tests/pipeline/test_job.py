"""The cohort job end to end on a real local Ray with tiny models: S3 in and out, geometry,
resume and idempotence, a killed driver, a killed model actor, the failure budget, retries."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mcs_batch.config import load_config
from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from mcs_batch.scan import discover_cases
from mcs_batch.testdata.sample import build_sample_archive
from mcs_batch.testdata.series import write_series

pytestmark = pytest.mark.usefixtures("ray_local")
QUIET = {"progress": lambda message: None}


def job(inputs, out, tmp_path: Path, *extra: str, prompts=("a bright lesion",)):
    return load_config(
        preset="tiny",
        prompts=list(prompts),
        target="lesion",
        overrides=[
            f"inputs.uris={json.dumps([str(i) for i in inputs])}",
            f"outputs.uri={json.dumps(str(out))}",
            f"models.cache_dir={tmp_path.parent / 'model-cache'}",
            "outputs.catalog_flush_cases=2",
            *extra,
        ],
    )


def small_cohort(folder: Path, n_images: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        img = rng.integers(0, 40, (48 + 8 * i, 64), dtype=np.uint8)
        img[10:30, 20 + i : 40 + i] = 230
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    write_series(folder / "ct", rows=32, cols=32, n_slices=5, series_seed="cohort")
    return folder


def pairs(catalog: Catalog) -> list[tuple[str, str]]:
    table = catalog.cases(["case_id", "target"])
    return list(zip(table.column("case_id").to_pylist(), table.column("target").to_pylist(), strict=True))


def test_job_from_s3_to_s3_accounts_for_every_input(tmp_path: Path, s3_bucket, s3_server):
    bucket, fs = s3_bucket
    archive = build_sample_archive(tmp_path / "archive")
    for p in sorted(archive.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{bucket}/cohorts/archive/{p.relative_to(archive).as_posix()}")
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    cfg = job([f"s3://{bucket}/cohorts/archive"], f"s3://{bucket}/out", tmp_path)
    summary = run_job(cfg, storage=storage, **QUIET)

    catalog = Catalog(f"s3://{bucket}/out", storage=storage)
    rows = {r["case_id"]: r for r in catalog.cases().to_pylist()}
    expected = {r.case_id: r for r in discover_cases([str(archive)])}  # the same ids on local disk and S3
    assert set(rows) == set(expected) and len(pairs(catalog)) == len(expected)  # every case, once
    keys = sorted(k for r in rows.values() for k in r["source_keys"])
    assert keys == sorted(f"archive/{p.relative_to(archive)}" for p in archive.rglob("*") if p.is_file())
    statuses = {r["source_keys"][0].split("/")[1] + "/" + r["kind"]: r["status"] for r in rows.values()}
    assert statuses["phantom_ct/dicom_series"] == "ok" and statuses["nifti/nifti"] == "ok"
    by_key = {k.removeprefix("archive/"): r for r in rows.values() for k in r["source_keys"]}
    assert (by_key["broken/MR_truncated.dcm"]["status"], by_key["broken/MR_truncated.dcm"]["error_code"]) == (
        "failed", "truncated")  # fmt: skip
    assert by_key["broken/truncated.png"]["status"] == "failed"  # fails at decode, in the pipeline
    assert by_key["broken/rtstruct.dcm"]["status"] == "skipped"
    for case_id, row in rows.items():
        if row["status"] != "ok":
            assert row["mask_uri"] is None
            continue
        with fs.open(row["mask_uri"], "rb") as f:
            mask = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(f.read()))
        record = expected[case_id]
        assert mask.shape == tuple(record.shape)  # the source geometry, exactly
        np.testing.assert_allclose(mask.affine, np.asarray(record.affine).reshape(4, 4), atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
        assert int(np.asarray(mask.dataobj).sum()) == row["mask_voxels"]
        if record.kind == "image" or any(w.endswith("1 mm pixels assumed") for w in record.warnings):
            assert row["mask_volume_ml"] is None  # no physical pixel size: no volume
        else:
            volume_ml = row["mask_voxels"] * float(np.prod(record.spacing_mm)) / 1000
            assert row["mask_volume_ml"] == pytest.approx(volume_ml) and record.kind != "image"
        assert row["tiny_models"] is True and row["config_hash"] == cfg.hash()
        assert len(row["clip_sha256"]) == 64 and len(row["sam_sha256"]) == 64
        if record.shape[2] == 1:
            with fs.open(row["mask_png_uri"], "rb") as f:
                assert Image.open(f).size == (record.shape[0], record.shape[1])
    slices = catalog.slices().to_pylist()
    ok_slices = sum(expected[c].shape[2] for c, r in rows.items() if r["status"] == "ok")
    assert len(slices) == ok_slices == summary.slices - 1  # the truncated PNG's slice failed
    run = json.loads(fs.cat_file(f"{bucket}/out/runs/{summary.run_id}.json"))
    assert run["status"] == "succeeded" and run["config_hash"] == cfg.hash() and run["tiny_models"] is True
    assert run["counts"]["cases"] == len(expected) and "ray" in run["packages"]
    assert all(len(d) == 64 for d in run["model_sha256"]["sam"])


def snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not {"runs", "locks"} & set(p.parts)
    }


def test_second_run_writes_nothing_new(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in")
    cfg = job([cohort], tmp_path / "out", tmp_path)
    first = run_job(cfg, **QUIET)
    before = snapshot(tmp_path / "out")
    second = run_job(cfg, **QUIET)
    assert first.cases == 7 and second.cases == 0 and second.skipped_committed == 7
    assert snapshot(tmp_path / "out") == before  # byte for byte: no rewritten row, no new file
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 2  # both runs are on record


def test_another_config_is_refused_in_the_same_output(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=1)
    run_job(job([cohort], tmp_path / "out", tmp_path), **QUIET)
    with pytest.raises(ConfigError, match="another configuration"):
        run_job(job([cohort], tmp_path / "out", tmp_path, prompts=("something else",)), **QUIET)
    # resources, the weight cache and the device do not change results: allowed
    run_job(job([cohort], tmp_path / "out", tmp_path, "resources.sam_batch=1"), **QUIET)
    small_cohort(tmp_path / "in", n_images=2)  # a backfill, with the weights cached elsewhere
    moved = job([cohort], tmp_path / "out", tmp_path, f"models.cache_dir={tmp_path / 'cache'}", "models.device=cpu")
    assert run_job(moved, **QUIET).cases == 1
    assert len(pairs(Catalog(str(tmp_path / "out")))) == 3


def start_segment(cohort: Path, out: Path, tmp_path: Path, *settings: str) -> subprocess.Popen:
    """`mcs-batch segment` with tiny models in a process of its own, with its own local Ray, in a new
    session (so that the test can kill it and everything it started as one group)."""
    cmd = [sys.executable, "-m", "mcs_batch.cli", "segment", str(cohort), "--out", str(out), "--models", "tiny",
           "--prompt", "a bright lesion", "--target", "lesion", "--num-cpus", "2", "--object-store-mb", "256",
           "--set", "outputs.catalog_flush_cases=1", "--set", f"models.cache_dir={tmp_path.parent / 'model-cache'}",
           *(item for s in settings for item in ("--set", s))]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (Ray puts each worker in a process group of its own, so a
    process group is not all that a driver started; its session is)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    pids.append(int(entry.name))
    return pids


def kill_session(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGKILL a driver started by `start_segment` and everything it started, as a dead node would
    lose them, and wait until all are gone: otherwise a worker of the dead run can outlive it by
    seconds and write into OUT while the next run is already repairing it."""
    deadline = time.monotonic() + timeout
    while pids := session_pids(proc.pid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes of the killed driver still alive: {pids}"
        time.sleep(0.05)
    proc.wait(timeout=timeout)


def test_killed_driver_then_rerun_finishes_every_case_exactly_once(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=14)
    out = tmp_path / "out"
    proc = start_segment(cohort, out, tmp_path, "resources.saliency_batch=1", "resources.sam_batch=1",
                         "testing.exit_driver_after_commits=3")  # fmt: skip
    try:
        # the driver dies hard right after its third commit (no clean-up, like SIGKILL)
        assert proc.wait(timeout=300) == 137
    finally:
        kill_session(proc)  # whatever the driver started (its local Ray and its workers)
    committed_before = len(pairs(Catalog(str(out))))
    assert 3 <= committed_before < 15
    run = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert run["status"] == "running"  # the killed run never got to write its end

    summary = run_job(job([cohort], out, tmp_path, "outputs.catalog_flush_cases=1"), **QUIET)
    final = pairs(Catalog(str(out)))
    assert len(final) == len(set(final)) == 15  # 14 images + 1 series, each exactly once
    assert summary.cases == 15 - committed_before  # only what was missing was redone
    slices = Catalog(str(out)).slices(["case_id", "slice_index"]).to_pylist()
    keys = [(s["case_id"], s["slice_index"]) for s in slices]
    assert len(keys) == len(set(keys)) == 14 + 5


def test_killed_model_actor_loses_and_duplicates_nothing(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=8)
    marker = tmp_path / "fault-fired"
    cfg = job([cohort], tmp_path / "out", tmp_path, "resources.sam_batch=1",
              "testing.kill_sam_actor_after_batches=3", f"testing.fault_marker={json.dumps(str(marker))}")  # fmt: skip
    summary = run_job(cfg, **QUIET)
    assert marker.exists()  # the SAM actor really died once mid-run
    final = pairs(Catalog(str(tmp_path / "out")))
    assert len(final) == len(set(final)) == 9
    assert summary.by_status == {"ok": 9}


def test_failure_budget_aborts_a_misconfigured_job(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(8):
        (folder / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    small_cohort(folder / "ok", n_images=1)
    cfg = job(
        [folder], tmp_path / "out", tmp_path, "failure_budget.max_failed_fraction=0.3", "failure_budget.min_cases=4"
    )
    summary = run_job(cfg, **QUIET)
    assert "failure budget exceeded" in summary.aborted
    run = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    assert run["status"] == "aborted" and "failure budget" in run["reason"]
    assert summary.by_status.get("failed", 0) >= 3  # what finished before the abort is committed


def test_retry_failed_redoes_only_failures_and_keeps_one_row(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=2)
    good = (cohort / "img00.png").read_bytes()
    (cohort / "img01.png").write_bytes(good[: len(good) // 3])  # broken: fails at decode
    out = tmp_path / "out"
    first = run_job(job([cohort], out, tmp_path), **QUIET)
    assert first.by_status == {"ok": 2, "failed": 1}
    (cohort / "img01.png").write_bytes(good)  # the archive gets fixed
    plain = run_job(job([cohort], out, tmp_path), **QUIET)
    assert plain.cases == 0  # failures are committed too: not redone without --retry-failed
    retried = run_job(job([cohort], out, tmp_path), retry_failed=True, **QUIET)
    assert retried.by_status == {"ok": 1}
    rows = Catalog(str(out)).cases(["case_id", "status"]).to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}


def test_an_unwritable_mask_fails_only_its_own_target(tmp_path: Path):
    from mcs_batch.records import make_case_id

    cohort = small_cohort(tmp_path / "in", n_images=1)
    (cohort / "ct").rename(tmp_path / "ct-not-used")
    out = tmp_path / "out"
    blocker = out / "masks" / make_case_id("file:in/img00.png") / "first.nii.gz"
    blocker.mkdir(parents=True)  # a folder where the mask file should go: the write fails
    cfg = job(
        [cohort], out, tmp_path, "targets=[{name: first, prompts: [a lesion]}, {name: second, prompts: [a mass]}]"
    )
    summary = run_job(cfg, **QUIET)
    rows = {r["target"]: r for r in Catalog(str(out)).cases().to_pylist()}
    assert (rows["first"]["status"], rows["first"]["error_code"]) == ("failed", "internal_error")
    assert "first" in rows["first"]["error_message"]
    assert rows["second"]["status"] == "ok" and rows["second"]["mask_uri"].endswith("/second.nii.gz")
    assert summary.by_status == {"failed": 1, "ok": 1}
