"""The catalog on Delta tables: commits, one row per pair whatever is replayed, rows that replace rows,
what the grouper redoes, time travel, and the tables refusing what this release cannot write."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from mcs_batch.errors import ConfigError
from mcs_batch.outputs.catalog import CASES, SLICES, Catalog, CommittedPairs, CommitWindow, new_run_id
from mcs_batch.outputs.delta import CommitConflict, with_retries
from mcs_batch.query import query
from mcs_batch.records import make_case_id


def row(case_id: str, status: str = "ok", run: str = "run1", **extra) -> dict:
    return {"case_id": case_id, "target": "t", "status": status, "run_id": run, **extra}


def slices(case_id: str, run: str = "run1", n: int = 2) -> list[dict]:
    return [{"case_id": case_id, "target": "t", "slice_index": k, "run_id": run} for k in range(n)]


def test_a_commit_is_two_delta_commits_and_a_pair_is_never_twice(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    result = catalog.commit("run1", 0, [row("a"), row("b", "failed")], slices("a"))
    assert (result.inserted, result.replaced, result.dropped) == (2, 0, 0)
    assert result.versions == {"slices": 0, "cases": 0}
    assert catalog.committed() == {("a", "t"): "ok", ("b", "t"): "failed"}
    # the same commit again (a driver that retried after an ambiguous failure), and another run's rows
    # for the same pairs (a concurrent job that lost the race): nothing new
    again = catalog.commit("run1", 0, [row("a"), row("b", "failed")], slices("a"))
    other = catalog.commit("run2", 0, [row("a", run="run2")], slices("a", "run2"))
    assert (again.inserted, again.dropped, other.inserted, other.dropped) == (0, 2, 0, 1)
    assert catalog.cases(["case_id", "run_id"]).to_pylist() == [{"case_id": "a", "run_id": "run1"},
                                                                {"case_id": "b", "run_id": "run1"}]  # fmt: skip
    assert catalog.slices(["case_id", "slice_index", "run_id"]).num_rows == 2  # run2's slices: not committed
    assert catalog.read(SLICES).num_rows == 4  # ... though in the table until compaction removes them
    assert DeltaTable(str(tmp_path / "catalog" / "cases")).version() == 0  # a merge that changes nothing: no commit
    assert DeltaTable(str(tmp_path / "catalog" / "slices")).version() == 1  # the replay appended nothing
    assert json.loads(DeltaTable(str(tmp_path / "catalog" / "cases")).schema().to_json())["fields"][0]["metadata"] == {
        "mcs_batch.schema_version": CASES.version}


def test_a_row_replaces_only_the_row_it_names(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    catalog.commit("run1", 0, [row("a", "failed", error_code="unreadable"), row("b", instances="v1")], [])
    # run2 retries a (whose run1 row it read) and redoes b, grown (instances v2)
    result = catalog.commit("run2", 0, [row("a", run="run2", _replaces="run1"),
                                        row("b", run="run2", instances="v2", _replaces="run1")],
                            slices("a", "run2") + slices("b", "run2", 3))  # fmt: skip
    assert (result.inserted, result.replaced, result.dropped) == (0, 2, 0)
    # run3 read the catalog before run2 committed: its replacement of run1's rows finds run2's instead
    late = catalog.commit("run3", 0, [row("a", run="run3", _replaces="run1")], slices("a", "run3"))
    assert (late.replaced, late.dropped) == (0, 1)
    table = catalog.cases(["case_id", "run_id", "status"]).to_pylist()
    rows = {r["case_id"]: (r["run_id"], r["status"]) for r in table}
    assert rows == {"a": ("run2", "ok"), "b": ("run2", "ok")}
    shown = catalog.slices(["case_id", "slice_index", "run_id"]).to_pylist()
    assert sorted((r["case_id"], r["slice_index"], r["run_id"]) for r in shown) == [
        ("a", 0, "run2"), ("a", 1, "run2"), ("b", 0, "run2"), ("b", 1, "run2"), ("b", 2, "run2")]  # fmt: skip


def test_what_the_grouper_redoes(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    catalog.commit("run1", 0, [
        row("ok", instances="v1"),
        row("transient", "failed", error_code="unreadable", error_message="503", attempts=1),
        row("spent", "failed", error_code="unreadable", attempts=3),
        row("broken", "failed", error_code="truncated", attempts=1),
    ], [])  # fmt: skip
    targets = frozenset({"t"})
    pairs = CommittedPairs(catalog.committed_state(), max_attempts=3)
    assert len(pairs) == 4
    assert pairs.judge("ok", "v1", targets) == ({"t"}, {}, False)
    assert pairs.judge("ok", "v2", targets) == (set(), {"t": {"replaces": "run1", "attempts": 0, "history": []}}, True)
    done, redo, _ = pairs.judge("transient", None, targets)
    assert done == set() and redo == {"t": {"replaces": "run1", "attempts": 1,
                                            "history": ["attempt 1 (run1): unreadable: 503"]}}  # fmt: skip
    assert pairs.judge("spent", None, targets)[0] == {"t"}  # its attempts are spent: it stays failed
    assert pairs.judge("broken", None, targets)[0] == {"t"}  # a permanent failure: not retried ...
    again = CommittedPairs(catalog.committed_state(), max_attempts=3, retry_failed=True)
    assert again.judge("broken", None, targets)[1]["t"]["replaces"] == "run1"  # ... unless --retry-failed
    assert pairs.judge("new", None, targets) == (set(), {}, False)


def test_a_series_absorbs_the_failure_rows_its_objects_had_as_cases_of_their_own(tmp_path: Path):
    """An object whose read failed in run1 was a case of its own (a failure row keyed by the object);
    in run2 it is read, and its series' row deletes that row in the same commit: no object in two rows."""
    catalog = Catalog(str(tmp_path))
    member, other = make_case_id("file:ct/s06.dcm"), make_case_id("file:img/x.png")
    catalog.commit("run1", 0, [row("series", "failed", error_code="unreadable", source_keys=["ct/s01.dcm"]),
                               row(member, "failed", error_code="unreadable", source_keys=["ct/s06.dcm"]),
                               row(other, "failed", error_code="truncated", source_keys=["img/x.png"])],
                   [])  # fmt: skip
    pairs = CommittedPairs(catalog.committed_state(), max_attempts=3)
    keys = ["ct/s01.dcm", "ct/s06.dcm"]
    assert pairs.object_failures("series", keys, frozenset({"t"})) == {"t": {member: "run1"}}
    assert pairs.object_failures(member, ["ct/s06.dcm"], frozenset({"t"})) == {}  # its own row: a redo, not this
    absorbs = json.dumps({member: "run1", other: "run0"})  # run0: not the row there (another run replaced it)
    result = catalog.commit("run2", 0, [row("series", run="run2", source_keys=keys, _replaces="run1",
                                            _absorbs=absorbs)], slices("series", "run2"))  # fmt: skip
    assert (result.inserted, result.replaced, result.dropped) == (0, 1, 0)
    table = catalog.cases(["case_id", "run_id", "status"]).to_pylist()
    rows = {r["case_id"]: (r["run_id"], r["status"]) for r in table}
    assert rows == {"series": ("run2", "ok"), other: ("run1", "failed")}


OLD, LIVE = "20250101T000000Z-aaaaaa", "20250102T000000Z-bbbbbb"  # run ids begin with their start time


def test_a_commit_with_a_window_reads_the_runs_since_its_start_and_the_rows_it_names(tmp_path: Path):
    """The job's writer passes a CommitWindow (its start less the margin, and the runs alive then): the
    merge reads the rows of those runs and of the runs its commit names, not the whole table."""
    catalog = Catalog(str(tmp_path))
    member = make_case_id("file:ct/s06.dcm")
    catalog.commit(OLD, 0, [row("a", "failed", run=OLD, error_code="unreadable"), row("b", run=OLD),
                            row(member, "failed", run=OLD, error_code="unreadable", source_keys=["ct/s06.dcm"])],
                   [])  # fmt: skip
    catalog.commit(LIVE, 0, [row("d", run=LIVE)], [])  # a long job, still running when run2 started
    window = CommitWindow.from_start(time.time(), running=[LIVE])
    run2, run3 = new_run_id(), new_run_id()
    result = catalog.commit(run2, 0, [row("a", run=run2, _replaces=OLD),
                                      row("series", run=run2, _absorbs=json.dumps({member: OLD})),
                                      row("c", run=run2), row("d", run=run2)],
                            slices("c", run2), window=window)  # fmt: skip
    assert (result.inserted, result.replaced, result.dropped) == (2, 1, 1)  # named rows found; LIVE's d kept
    late = catalog.commit(run3, 0, [row("c", run=run3)], slices("c", run3), window=window)  # a run since: seen
    assert (late.inserted, late.dropped) == (0, 1)
    rows = {r["case_id"]: r["run_id"] for r in catalog.cases(["case_id", "run_id"]).to_pylist()}
    assert rows == {"a": run2, "b": OLD, "series": run2, "c": run2, "d": LIVE}
    # What the window leaves unread: OLD's row of b, which a writer that judged the committed pairs at
    # its start never commits again unnamed (why only the job's writer passes a window).
    assert catalog.commit(new_run_id(), 0, [row("b", run="x")], [], window=window).inserted == 1


def test_a_window_begins_an_hour_before_its_job(tmp_path: Path):
    window = CommitWindow.from_start(1_000_000_000.0, running=["r2", "r1"])  # 2001-09-09T01:46:40Z
    assert window == CommitWindow("20010909T004640Z", ("r1", "r2"))
    assert new_run_id() > CommitWindow.from_start(time.time(), []).since  # a run started now is in it


def test_time_travel_reads_the_tables_as_a_run_left_them(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    first = catalog.commit("20261201T010000Z-aaaaaa", 0, [row("a", run="20261201T010000Z-aaaaaa")],
                           slices("a", "20261201T010000Z-aaaaaa"))  # fmt: skip
    tables = {t: {"first": v, "last": v} for t, v in first.versions.items()}
    catalog.write_run("20261201T010000Z-aaaaaa", {"run_id": "20261201T010000Z-aaaaaa", "status": "succeeded",
                                                  "tables": tables})  # fmt: skip
    catalog.commit("run2", 0, [row("b", run="run2")], slices("b", "run2"))
    now = [r for (r,) in query(str(tmp_path), "SELECT case_id FROM cases ORDER BY 1")[1]]
    assert now == ["a", "b"]
    for as_of in ("20261201T010000Z-aaaaaa", "0"):
        cases = query(str(tmp_path), "SELECT case_id FROM cases", as_of=as_of)[1]
        shown = query(str(tmp_path), "SELECT DISTINCT case_id FROM slices", as_of=as_of)[1]
        assert cases == [("a",)] and shown == [("a",)], as_of
    assert query(str(tmp_path), "SELECT count(*) FROM cases", as_of="2001-01-01T00:00:00Z")[1] == [(0,)]
    with pytest.raises(ConfigError, match="no record of that run"):
        query(str(tmp_path), "SELECT 1", as_of="20261201T020000Z-bbbbbb")


def test_what_this_release_cannot_write_is_refused_in_one_line_and_nothing_is_written(tmp_path: Path):
    # a newer release's schema
    newer = CASES.arrow_schema()
    newer = newer.set(0, newer.field(0).with_metadata({"mcs_batch.schema_version": "99"}))
    newer_out = tmp_path / "newer"
    columns = pa.schema([newer.field(n) for n in ("case_id", "target", "status")])
    write_deltalake(str(newer_out / "catalog" / "cases"),
                    pa.table({"case_id": ["z"], "target": ["t"], "status": ["ok"]}).cast(columns))  # fmt: skip
    with pytest.raises(ConfigError, match=r"schema version 99, newer than this release's") as e:
        Catalog(str(newer_out)).check_writable()
    assert "\n" not in str(e.value)
    out = tmp_path / "out"
    catalog = Catalog(str(out))
    catalog.commit("run1", 0, [row("a")], [])
    cases = out / "catalog" / "cases"
    # a Delta protocol with a writer feature this release does not know
    log = sorted((cases / "_delta_log").glob("*.json"))
    version = int(log[-1].stem) + 1
    (cases / "_delta_log" / f"{version:020d}.json").write_text(json.dumps(
        {"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": [],
                      "writerFeatures": ["aFeatureOfTheFuture"]}}) + "\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs Delta writer version 7 with features \['aFeatureOfTheFuture'\]"):
        Catalog(str(out)).check_writable()
    # a corrupt log entry
    (cases / "_delta_log" / f"{version:020d}.json").write_text("{not json\n")
    with pytest.raises(ConfigError, match="cases table: cannot read its log") as e:
        Catalog(str(out)).cases()
    assert str(out) in str(e.value)
    # an OUT that is not a catalog: nothing to read, and query says so
    with pytest.raises(ConfigError, match="no catalog or scan manifest here"):
        query(str(tmp_path / "elsewhere"), "SELECT 1")


def test_a_commit_that_keeps_conflicting_fails_and_leaves_the_table_as_it_was(tmp_path: Path):
    from deltalake.exceptions import CommitFailedError

    calls = []

    def conflicting():
        calls.append(1)
        raise CommitFailedError("Transaction failed: a concurrent transaction wrote what this one read")

    with pytest.raises(CommitConflict, match="3 attempts conflicted with concurrent commits; nothing of it"):
        with_retries(conflicting, what="commit 7 of run r", attempts=3)
    assert len(calls) == 3


def test_mask_paths_use_ids_only(tmp_path: Path):
    nifti, png = Catalog(str(tmp_path)).mask_paths("0123abcd", "lungs")
    assert nifti.endswith("/masks/0123abcd/lungs.nii.gz") and png.endswith("/masks/0123abcd/lungs.png")


def test_derived_targets_do_not_count_as_another_configuration(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    catalog.commit("seg", 0, [{**row("a"), "config_hash": "0bfcc494eaf02685"}], [])
    catalog.commit("refine", 0, [{"case_id": "a", "target": "t@weak", "status": "ok", "config_hash": "77aa"}], [])
    assert catalog.config_hashes() == {"0bfcc494eaf02685"}  # a refinement does not lock the folder
