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


def test_a_run_declared_dead_while_it_was_paused_commits_no_more(tmp_path: Path):
    """A driver paused past the ttl (a suspended VM) is swept by another job; when it comes back, its
    next commit is refused: other jobs' commit windows no longer include it (outputs/catalog.py)."""
    import time

    catalog = Catalog(str(tmp_path))
    catalog.write_run("run-paused", {"run_id": "run-paused", "status": "running"})
    beat = RunHeartbeat(catalog, "run-paused", heartbeat_s=3600)  # no beat in this test but the first
    beat._document["host"] = "another-host"  # judged by the age of its beats, as from another node
    beat.start()
    assert beat.fenced(ttl_s=120) is None  # beating: nothing read
    beat.last_beat -= 100  # paused 100 s: its record is read, still "running", so it goes on
    assert beat.fenced(ttl_s=120) is None and beat.gap == 0.0
    beat._document["heartbeat_at"] = "2026-01-01T00:00:00+00:00"
    beat._write()  # the file as a stale beat leaves it ...
    beat.last_beat = time.time() - 300  # ... after a pause of 300 s
    assert "closed the record of run run-paused" in " ".join(sweep(catalog, live="run-b", ttl_s=120))
    beat._document["heartbeat_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    beat._write()  # back: its beat thread writes first (a fresh beat; the gap is remembered) ...
    reason = beat.fenced(ttl_s=120)  # ... and its writer asks before the next commit
    assert reason is not None and "declared dead" in reason and "run-b" in reason
    beat.stop()
