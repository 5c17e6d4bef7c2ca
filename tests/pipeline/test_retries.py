"""Transient failures (storage, memory) are retried by the next runs without --retry-failed, up to
failure_budget.transient_attempts attempts; then they stay, with their history. Permanent failures
(a broken file) are not retried."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline import run_job
from tests.pipeline.test_job import QUIET, job

pytestmark = pytest.mark.usefixtures("ray_local")
COLUMNS = ["status", "error_code", "attempts", "retryable", "history", "run_id"]


def images(folder: Path) -> Path:
    """in/img00.png, in/img01.png and in/broken.png (a permanent failure: truncated)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        image = rng.integers(0, 40, (40, 48), dtype=np.uint8)
        image[8:24, 10:30] = 230
        Image.fromarray(image).save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes((folder / "img00.png").read_bytes()[:120])
    return folder


def rows_by_key(out: str, storage: StorageOptions | None) -> dict[str, dict]:
    rows = Catalog(out, storage=storage).cases(["source_keys", *COLUMNS]).to_pylist()
    assert len(rows) == len({r["source_keys"][0] for r in rows})  # one row per pair, never two
    return {r["source_keys"][0]: r for r in rows}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_transient_storage_error_is_retried_by_the_next_run(tmp_path: Path, where, request):
    folder = images(tmp_path / "in")
    inputs, out, storage = [folder], str(tmp_path / "out"), None
    if where == "s3":
        bucket, fs = request.getfixturevalue("s3_bucket")
        server = request.getfixturevalue("s3_server")
        storage = StorageOptions(endpoint_url=server["endpoint_url"], key=server["key"], secret=server["secret"])
        fs.put(str(folder), f"{bucket}/in", recursive=True)
        inputs, out = [f"s3://{bucket}/in"], f"s3://{bucket}/out"
    fault = ["testing.unreadable_key=in/img00.png", f"testing.fault_marker={tmp_path / 'fired'}"]  # fails once
    first = run_job(job(inputs, out, tmp_path, *fault), storage=storage, **QUIET)
    assert first.by_status == {"ok": 1, "failed": 2}
    rows = rows_by_key(out, storage)
    failed = rows["in/img00.png"]
    assert (failed["status"], failed["error_code"], failed["attempts"], failed["retryable"], failed["history"]) == (
        "failed", "unreadable", 1, True, [])  # fmt: skip
    assert (rows["in/broken.png"]["error_code"], rows["in/broken.png"]["retryable"]) == ("truncated", False)

    second = run_job(job(inputs, out, tmp_path, *fault), storage=storage, **QUIET)  # no --retry-failed
    assert second.cases == 1 and second.by_status == {"ok": 1}  # the transient one only, not the broken file
    rows = rows_by_key(out, storage)
    retried = rows["in/img00.png"]
    assert (retried["status"], retried["attempts"], retried["retryable"], retried["run_id"]) == (
        "ok", 2, False, second.run_id)  # fmt: skip
    (earlier,) = retried["history"]
    assert earlier.startswith(f"attempt 1 ({first.run_id}): unreadable: ") and "injected storage fault" in earlier
    assert rows["in/broken.png"]["attempts"] == 1 and rows["in/img01.png"]["run_id"] == first.run_id


def test_a_failure_that_stays_transient_becomes_permanent_after_its_attempts(tmp_path: Path):
    folder = images(tmp_path / "in")
    out = tmp_path / "out"
    always = ["testing.unreadable_key=in/img01.png", "failure_budget.transient_attempts=2"]  # fails every time
    runs = [run_job(job([folder], out, tmp_path, *always), **QUIET) for _ in range(3)]
    assert [r.cases for r in runs] == [3, 1, 0]  # the third run has nothing left to try
    row = rows_by_key(str(out), None)["in/img01.png"]
    assert (row["status"], row["error_code"], row["attempts"], row["retryable"]) == ("failed", "unreadable", 2, False)
    assert [h.split(":")[0] for h in row["history"]] == [f"attempt 1 ({runs[0].run_id})"]
    assert row["run_id"] == runs[1].run_id
