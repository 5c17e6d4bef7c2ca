"""Two jobs on one OUT at once, and a driver killed mid-run: what readers see meanwhile, and what the
next run leaves (every pair and slice once, masks equal to an uninterrupted run's, no temporaries, no
run record left "running")."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from tests.outputs.test_commit_protocol import read_everywhere
from tests.pipeline.test_job import QUIET, job, kill_session, pairs, small_cohort, start_segment

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_on_overlapping_inputs_at_once_both_finish_and_each_pair_is_once(tmp_path: Path, where, request):
    cohort = small_cohort(tmp_path / "in", n_images=6)
    storage = None
    out = str(tmp_path / "out")
    if where == "s3":
        bucket, _ = request.getfixturevalue("s3_bucket")
        storage = StorageOptions(**request.getfixturevalue("s3_server"))
        out = f"s3://{bucket}/out"
    # the second job's input is a folder of the first's: 3 of its images and the series overlap
    half = tmp_path / "half" / "in"
    half.mkdir(parents=True)
    for name in ("img00.png", "img01.png", "img02.png"):
        (half / name).write_bytes((cohort / name).read_bytes())
    shutil.copytree(cohort / "ct", half / "ct")
    summaries: dict = {}

    def segment(name: str, inputs: list) -> None:
        # two jobs on one 2-CPU Ray: each takes one model actor (0.5 CPU), as the README tells ops to
        summaries[name] = run_job(job(inputs, out, tmp_path / name, "outputs.catalog_flush_cases=1",
                                      "resources.sam_actors=1"), storage=storage, **QUIET)  # fmt: skip

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    threads = [threading.Thread(target=segment, args=("a", [cohort])),
               threading.Thread(target=segment, args=("b", [half]))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    a, b = summaries["a"], summaries["b"]  # both finished (an exception would have left no summary)
    catalog = Catalog(out, storage=storage)
    final = pairs(catalog)
    # 7 cases from `in` (6 images and the series) and 3 image keys of `half` (keys start with the input's
    # folder name: in/... and in/... are the same keys, the series its UIDs): each pair once
    assert len(final) == len(set(final)) == 7
    assert a.cases + b.cases - a.dropped - b.dropped == 7  # what one of them lost, it did not commit
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


# the named steps of a commit are killed one by one in tests/outputs/test_commit_protocol.py; here one
# in CI (a SIGKILL at a random moment of a real job), the job killed at a named step in the slow tests
@pytest.mark.parametrize("kill", ["sigkill_at_random", pytest.param("slices_committed", marks=pytest.mark.slow)])
def test_a_killed_driver_leaves_readers_consistent_and_the_next_run_completes(tmp_path: Path, kill, uninterrupted):
    cohort = small_cohort(tmp_path / "in", n_images=14)
    out = tmp_path / "out"
    # blocks and batches of one slice: cases finish (and commit) one by one, so the kill lands mid-run
    settings = ["resources.block_rows=1", "resources.saliency_batch=1", "resources.sam_batch=1"]
    if kill == "slices_committed":  # a named step of a commit: its slices committed, its cases not yet
        settings += ["testing.crash_point=slices_committed", "testing.crash_at_commit=3"]
    proc = start_segment(cohort, out, tmp_path, *settings)
    try:
        if kill == "sigkill_at_random":
            parts = random.randint(1, 6)  # killed after a random number of commits, somewhere past it
            deadline = time.monotonic() + 300
            while len(list((out / "catalog" / "cases" / "_delta_log").glob("*.json"))) < parts and (
                    time.monotonic() < deadline):  # fmt: skip
                time.sleep(0.01)
            time.sleep(random.uniform(0.0, 0.3))
            assert proc.poll() is None, "the driver finished before it could be killed"
            kill_session(proc)
        else:
            assert proc.wait(timeout=300) == 137
    finally:
        kill_session(proc)  # whatever the driver started (its local Ray and its workers)

    for reader, (cases, slices) in read_everywhere(str(out), None).items():  # before the next run
        assert len(cases) == len(set(cases)) and len(slices) == len(set(slices)), reader
        assert {c for c, _ in slices} == set(cases), reader  # a case row's slice rows, and no other
    if kill == "slices_committed":
        cases = Catalog(str(out)).committed()
        assert len(cases) == 2  # two commits stand; the third's slices are in the table, not the catalog

    summary = run_job(job([cohort], out, tmp_path, "outputs.catalog_flush_cases=1"), **QUIET)
    catalog = Catalog(str(out))
    final = pairs(catalog)
    assert len(final) == len(set(final)) == 15
    keys = [(s["case_id"], s["slice_index"]) for s in catalog.slices(["case_id", "slice_index"]).to_pylist()]
    assert len(keys) == len(set(keys)) == 14 + 5
    assert mask_contents(out) == uninterrupted  # the same masks, nothing half written
    left = sorted(p.relative_to(out).as_posix() for p in (out / "staging").rglob("*"))
    assert not list(out.rglob(".tmp-*")) and left in ([], ["staging/tmp", "staging/tmp/tmp"]), (summary.run_id, left)
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted(r["status"] for r in records) == ["failed", "succeeded"]  # the dead run is closed
    dead = next(r for r in records if r["status"] == "failed")
    assert summary.run_id in dead["reason"] and "driver died" in dead["reason"]


def test_an_unwritable_out_a_busy_metrics_port_or_no_gpu_is_one_line_and_leaves_no_running_record(tmp_path: Path):
    cohort = small_cohort(tmp_path / "in", n_images=1)
    with socket.socket() as closed:  # an object store nothing answers at
        closed.bind(("127.0.0.1", 0))
        nowhere = StorageOptions(endpoint_url=f"http://127.0.0.1:{closed.getsockname()[1]}", key="k", secret="s")
    unreachable = job([cohort], tmp_path / "out", tmp_path, 'inputs.uris=["s3://archive/chest"]')
    with pytest.raises(ConfigError, match="s3://archive/chest: cannot list input"):
        run_job(unreachable, storage=nowhere, **QUIET)
    assert not (tmp_path / "out").exists()  # inputs it cannot read: OUT untouched, not even locks/
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
    assert not list((tmp_path / "out" / "locks").iterdir())  # and its heartbeat gone with it
    assert run_job(job([cohort], tmp_path / "out", tmp_path), **QUIET).cases == 2
    assert not list((tmp_path / "out" / "locks").iterdir())  # locks/: running jobs only


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
    training = entry["training"]  # what train-weak will decide: nothing trained under WORK yet
    n = training["labels"]["total"]
    assert training["reused"] is False and training["labels"]["new"] == n and len(training["identity"]) == 16
    assert training["decision"] == f"new training: {n} labels ({n} new, 0 changed, 0 removed)"
    assert f"weakly supervised retraining of lesion: {training['decision']}" in said
    with pytest.raises(ConfigError, match=r"weak\.address"):
        job([cohort], tmp_path / "out", tmp_path, "weak.enabled=true")
