"""The catalog across runs of the real job: time travel to what a run left, the end-of-job compaction,
and a catalog of the previous layout migrated, after which a re-run finds every pair committed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mcs_batch.cli import main
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.maintenance import file_counts
from mcs_batch.pipeline import run_job
from mcs_batch.query import query
from tests.outputs.legacy import to_legacy_layout
from tests.pipeline.test_job import QUIET, job, pairs, small_cohort

pytestmark = pytest.mark.usefixtures("ray_local")


def test_time_travel_compaction_and_a_migrated_catalog_across_runs(tmp_path: Path, capsys):
    cohort = small_cohort(tmp_path / "in", n_images=4)
    out = tmp_path / "out"
    first = run_job(job([cohort], out, tmp_path), **QUIET)
    record = json.loads((out / "runs" / f"{first.run_id}.json").read_text())
    assert record["tables"]["cases"]["last"] >= record["tables"]["cases"]["first"] == 0
    for i in (4, 5):  # two images arrive
        shutil.copy(cohort / "img00.png", cohort / f"img{i:02d}.png")
    second = run_job(job([cohort], out, tmp_path, "outputs.compact_min_files=2"), **QUIET)
    assert second.cases == 2 and second.skipped_committed == 5
    as_of_first = sorted(c for (c,) in query(str(out), "SELECT case_id FROM cases", as_of=first.run_id)[1])
    assert len(as_of_first) == 5 and len(pairs(Catalog(str(out)))) == 7  # run 1's rows, after run 2 committed
    record = json.loads((out / "runs" / f"{second.run_id}.json").read_text())
    compacted = record["maintenance"]  # the second job compacted the tables past 2 files at its end
    assert compacted["cases"]["files_before"] >= 2 and compacted["cases"]["files_after"] == 1
    assert file_counts(Catalog(str(out)))["cases"] == 1

    before = sorted(Catalog(str(out)).cases(["case_id", "target", "status", "run_id"]).to_pylist(),
                    key=lambda r: r["case_id"])  # fmt: skip
    to_legacy_layout(out)  # the same OUT as the previous release would have left it
    assert main(["segment", str(cohort), "--out", str(out), "--models", "tiny", "--prompt", "a bright lesion",
                 "--target", "lesion", "--set", f"models.cache_dir={tmp_path.parent / 'model-cache'}"]) == 2
    assert "catalog migrate" in capsys.readouterr().err  # one line naming the command, nothing written
    assert main(["catalog", "migrate", str(out)]) == 0
    after = sorted(Catalog(str(out)).cases(["case_id", "target", "status", "run_id"]).to_pylist(),
                   key=lambda r: r["case_id"])  # fmt: skip
    assert after == before
    third = run_job(job([cohort], out, tmp_path), **QUIET)
    assert third.cases == 0 and third.skipped_committed == 7  # every committed pair is found again
