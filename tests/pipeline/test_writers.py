"""Two jobs on one OUT, and a driver killed mid-run: what readers see meanwhile, and what the next run
leaves (every pair and slice once, masks equal to an uninterrupted run's, no temporaries, no run
record left "running")."""

from __future__ import annotations

import gzip
import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.lease import LeaseHeld
from mcs_batch.pipeline import run_job
from tests.outputs.test_commit_protocol import read_everywhere
from tests.pipeline.test_job import QUIET, job, kill_session, pairs, small_cohort, start_segment

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_on_one_out_exits_or_waits_and_nothing_is_duplicated(tmp_path: Path, where, request):
    cohort = small_cohort(tmp_path / "in", n_images=6)
    storage = None
    out = str(tmp_path / "out")
    if where == "s3":
        bucket, _ = request.getfixturevalue("s3_bucket")
        storage = StorageOptions(**request.getfixturevalue("s3_server"))
        out = f"s3://{bucket}/out"
    first_done: dict = {}
    first = threading.Thread(target=lambda: first_done.update(summary=run_job(job([cohort], out, tmp_path,
                             "outputs.catalog_flush_cases=1"), storage=storage, **QUIET)))  # fmt: skip
    first.start()
    catalog = Catalog(out, storage=storage)
    deadline = time.monotonic() + 120
    while not catalog.fs.exists(catalog.path("locks")) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseHeld, match="being written by run"):  # the CLI prints this line and exits 2
        run_job(job([cohort], out, tmp_path), storage=storage, **QUIET)
    second = run_job(job([cohort], out, tmp_path, "outputs.lock_wait_seconds=300"), storage=storage, **QUIET)
    first.join(timeout=300)
    assert first_done["summary"].cases == 7  # the first job did everything ...
    assert second.cases == 0 and second.skipped_committed == 7  # ... the second waited, then found it done
    final = pairs(catalog)
    assert len(final) == len(set(final)) == 7
    keys = [(s["case_id"], s["slice_index"]) for s in catalog.slices(["case_id", "slice_index"]).to_pylist()]
    assert len(keys) == len(set(keys)) == 6 + 5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Masks of an uninterrupted run over the cohort the killed drivers get."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cohort = small_cohort(root / "in", n_images=14)
    run_job(job([cohort], root / "out", root, "outputs.catalog_flush_cases=1"), **QUIET)
    return mask_contents(root / "out")


def mask_contents(out: Path) -> dict[Path, bytes]:
    """Every mask file's content (NIfTI without its gzip header, which holds a time stamp)."""
    return {p.relative_to(out / "masks"): gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            for p in (out / "masks").rglob("*.*")}  # fmt: skip


@pytest.mark.parametrize("kill", ["sigkill_at_random", "between_publish"])
def test_a_killed_driver_leaves_readers_consistent_and_the_next_run_completes(tmp_path: Path, kill, uninterrupted):
    cohort = small_cohort(tmp_path / "in", n_images=14)
    out = tmp_path / "out"
    # blocks and batches of one slice: cases finish (and commit) one by one, so the kill lands mid-run
    settings = ["resources.block_rows=1", "resources.saliency_batch=1", "resources.sam_batch=1"]
    if kill == "between_publish":  # a named point of the protocol: slices published, cases not yet
        settings += ["testing.crash_point=between_publish", "testing.crash_at_commit=3"]
    proc = start_segment(cohort, out, tmp_path, *settings)
    try:
        if kill == "sigkill_at_random":
            parts = random.randint(1, 6)  # killed after a random number of commits, somewhere past it
            deadline = time.monotonic() + 300
            while len(list((out / "catalog" / "cases").glob("part-*"))) < parts and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(random.uniform(0.0, 0.3))
            assert proc.poll() is None, "the driver finished before it could be killed"
            kill_session(proc)
        else:
            assert proc.wait(timeout=300) == 137
    finally:
        kill_session(proc)  # whatever the driver started (its local Ray and its workers)

    for reader, (cases, slices) in read_everywhere(out).items():  # before the next run
        assert len(cases) == len(set(cases)) and len(slices) == len(set(slices)), reader
        assert {c for c, _ in slices} >= set(cases), reader  # a case row implies its slice rows
    if kill == "between_publish":
        staged = list((out / "staging").rglob("*.intent.json"))
        assert len(staged) == 1  # committed (the intent) but not yet all published

    summary = run_job(job([cohort], out, tmp_path, "outputs.catalog_flush_cases=1"), **QUIET)
    catalog = Catalog(str(out))
    final = pairs(catalog)
    assert len(final) == len(set(final)) == 15
    keys = [(s["case_id"], s["slice_index"]) for s in catalog.slices(["case_id", "slice_index"]).to_pylist()]
    assert len(keys) == len(set(keys)) == 14 + 5
    assert mask_contents(out) == uninterrupted  # the same masks, nothing half written
    assert not list(out.rglob(".tmp-*")) and not list((out / "staging").iterdir())
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted(r["status"] for r in records) == ["failed", "succeeded"]  # the dead run is closed
    dead = next(r for r in records if r["status"] == "failed")
    assert summary.run_id in dead["reason"] and "driver died" in dead["reason"]


def test_a_half_written_cases_temporary_left_in_the_catalog_is_repaired_and_the_run_completes(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=2)
    out = tmp_path / "out"
    run_job(job([cohort], out, tmp_path), **QUIET)
    part = next((out / "catalog" / "cases").glob("part-*.parquet"))
    half = part.read_bytes()[: part.stat().st_size // 2]
    (part.parent / f".tmp-5e1f-{part.name}").write_bytes(half)  # a driver of the old protocol killed mid-write
    (cohort / "img09.png").write_bytes((cohort / "img00.png").read_bytes())  # and one new image to do
    summary = run_job(job([cohort], out, tmp_path), **QUIET)
    assert summary.cases == 1 and summary.by_status == {"ok": 1}
    assert len(pairs(Catalog(str(out)))) == 4 and not list(out.rglob(".tmp-*"))


def test_an_unwritable_out_a_busy_metrics_port_or_no_gpu_is_one_line_and_leaves_no_running_record(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=1)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ConfigError, match="a-file/out: cannot write the output folder"):
        run_job(job([cohort], tmp_path / "a-file" / "out", tmp_path), **QUIET)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on port {port}"):
            run_job(job([cohort], tmp_path / "out", tmp_path, f"outputs.metrics_port={port}"), **QUIET)
    no_gpu = job([cohort], tmp_path / "out", tmp_path, "resources.gpus=1", "resources.gpu_wait_seconds=1")
    with pytest.raises(ConfigError, match=r"resources.gpus=1 asks for GPUs, but the cluster has none after 1 s"):
        run_job(no_gpu, **QUIET)  # a CPU-only cluster: not model actors waiting for a GPU forever
    assert not (tmp_path / "out" / "runs").exists()  # stopped before its run record
    assert run_job(job([cohort], tmp_path / "out", tmp_path), **QUIET).cases == 2  # and the lease was released


def test_the_retraining_trigger_is_recorded_and_never_fails_the_segmentation(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=1)
    cfg = job([cohort], tmp_path / "out", tmp_path, "weak.enabled=true", "weak.address=http://127.0.0.1:9")
    said: list[str] = []
    summary = run_job(cfg, progress=said.append)
    record = json.loads((tmp_path / "out" / "runs" / f"{summary.run_id}.json").read_text())
    assert record["status"] == "succeeded"  # the cases are committed whatever the submission does
    (entry,) = record["weak_jobs"]  # one target: one retraining job (nobody listens on port 9)
    assert entry["target"] == "lesion" and entry["work"] == str(tmp_path / "out" / "weak" / "lesion")
    assert "error" in entry and any("could not submit the retraining of lesion" in s for s in said)
    with pytest.raises(ConfigError, match=r"weak\.address"):
        job([cohort], tmp_path / "out", tmp_path, "weak.enabled=true")
