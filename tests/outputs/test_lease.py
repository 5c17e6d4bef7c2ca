"""Run heartbeats: which runs writing an OUT are alive, and the clean-up of what dead runs left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.lease import RunHeartbeat, heartbeats, live_runs, sweep


def test_a_run_beats_while_it_runs_and_its_file_goes_when_it_has_ended(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    beat = RunHeartbeat(catalog, "run-a", heartbeat_s=0.05)
    beat.start()
    first = heartbeats(catalog)["run-a"]["heartbeat_at"]
    import time

    time.sleep(0.3)
    assert heartbeats(catalog)["run-a"]["heartbeat_at"] > first  # it beats
    assert set(live_runs(catalog, ttl_s=60)) == {"run-a"}
    beat.stop()
    assert live_runs(catalog, ttl_s=60) == {} and heartbeats(catalog) == {}  # OUT/locks: running jobs only
    assert not list((tmp_path / "locks").iterdir())


def test_the_sweep_removes_what_dead_runs_left_and_never_touches_a_live_one(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    # a run whose process died (killed: no release), one whose heartbeat stopped long ago on another host,
    # and a live one
    child = ("import sys; from mcs_batch.outputs.catalog import Catalog; from mcs_batch.outputs.lease import "
             "RunHeartbeat; RunHeartbeat(Catalog(sys.argv[1]), 'run-killed').start(); import os; os._exit(137)")
    assert subprocess.run([sys.executable, "-c", child, str(tmp_path)], timeout=60).returncode == 137
    stale = {"run_id": "run-stale", "host": "another-host", "pid": 1, "heartbeat_at": "2026-01-01T00:00:00+00:00",
             "released": False}  # fmt: skip
    (tmp_path / "locks" / "run-run-stale.json").write_text(json.dumps(stale))
    live = RunHeartbeat(catalog, "run-live")
    live.start()
    for run in ("run-killed", "run-stale", "run-live"):
        (tmp_path / "staging" / run / "parts").mkdir(parents=True)
        catalog.write_run(run, {"run_id": run, "status": "running"})
    try:
        done = sweep(catalog, live="run-mine", ttl_s=120)
        assert sorted(done) == ["closed the record of run run-killed", "closed the record of run run-stale",
                                "removed staging/run-killed", "removed staging/run-stale"]  # fmt: skip
        left = sorted(p.name for p in (tmp_path / "staging").iterdir())
        assert left == ["run-live", "tmp"]  # tmp: the shared temporaries
        records = {r: json.loads((tmp_path / "runs" / f"{r}.json").read_text()) for r in ("run-killed", "run-live")}
        assert records["run-killed"]["status"] == "failed" and "driver died" in records["run-killed"]["reason"]
        assert records["run-live"]["status"] == "running"
        assert sorted(heartbeats(catalog)) == ["run-live"]  # the dead runs' heartbeat files are gone
    finally:
        live.stop()


def test_a_run_that_ends_between_the_listing_and_the_read_is_skipped_not_an_error(tmp_path: Path, monkeypatch):
    # CI found this interleaving with two jobs on one OUT: job A listed OUT/locks, job B stopped and
    # removed its file, then A read the listed files and failed with FileNotFoundError.
    catalog = Catalog(str(tmp_path))
    ending, staying = RunHeartbeat(catalog, "run-ending"), RunHeartbeat(catalog, "run-staying")
    ending.start()
    staying.start()
    read = catalog.fs.cat

    def cat_after_the_other_run_ended(paths, **kwargs):
        ending.stop()  # the file is listed but gone when read
        return read(paths, **kwargs)

    monkeypatch.setattr(catalog.fs, "cat", cat_after_the_other_run_ended)
    try:
        assert sorted(heartbeats(catalog)) == ["run-staying"]
        assert sweep(catalog, live="run-mine", ttl_s=120) == []
    finally:
        staying.stop()
