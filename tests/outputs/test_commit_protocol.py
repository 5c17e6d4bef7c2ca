"""The commit protocol under a crash at each of its points, read meanwhile as curators read it.

A child process commits 4 commits of 3 cases each (masks first, as the job does) and exits hard
(os._exit, like SIGKILL) at the named point of its second commit. Before the next run, pandas, DuckDB
and the catalog must show only committed rows; after the next run's repair and its own commits, every
case and slice exactly once, masks equal to an uninterrupted run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.query import query

CASES = [f"case{i:02d}" for i in range(12)]
PER_COMMIT = 3
CHILD = r"""
import json, sys
from mcs_batch.faults import TestingConfig, crash_hook
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.query import query
out, run, point, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
catalog = Catalog(out, owner=run)
catalog.crash_hook = crash_hook(TestingConfig(crash_point=point, crash_at_commit=2), lambda: catalog.commits)
if point == "during_repair":
    catalog.repair(live=run)
for seq, first in enumerate(range(0, len(cases), 3)):
    rows, slices = [], []
    for case in cases[first : first + 3]:
        path, _ = catalog.mask_paths(case, "t")
        catalog.write_bytes(path, f"mask of {case}".encode() * 50)
        rows.append({"case_id": case, "target": "t", "status": "ok", "run_id": run, "mask_uri": path})
        slices += [{"case_id": case, "target": "t", "slice_index": k, "run_id": run} for k in range(2)]
    catalog.commit(run, seq, rows, slices)
catalog.end_staging(run)
"""


def run_child(out: Path, run: str, point: str, cases: list[str]) -> int:
    args = [sys.executable, "-c", CHILD, str(out), run, point, json.dumps(cases)]
    return subprocess.run(args, timeout=120).returncode


def read_everywhere(out: Path) -> dict[str, tuple[list, list]]:
    """What each reader sees: case ids of the cases rows, (case, slice) of the slices rows."""
    import duckdb

    catalog = Catalog(str(out))
    slices = catalog.slices(["case_id", "slice_index"]).to_pylist()
    seen = {"catalog": (catalog.cases(["case_id"]).column("case_id").to_pylist(),
                        [(r["case_id"], r["slice_index"]) for r in slices])}  # fmt: skip
    folders = {name: out / "catalog" / name for name in ("cases", "slices")}
    frames = {name: pd.read_parquet(f) if f.exists() else pd.DataFrame(columns=["case_id", "slice_index"])
              for name, f in folders.items()}  # fmt: skip
    seen["pandas"] = (frames["cases"].case_id.tolist(),
                      list(zip(frames["slices"].case_id, frames["slices"].slice_index, strict=True)))  # fmt: skip
    con = duckdb.connect()

    def duck(name: str, columns: str) -> list[tuple]:
        if not any(folders[name].glob("*.parquet")):
            return []
        return con.sql(f"SELECT {columns} FROM read_parquet('{folders[name]}/*.parquet')").fetchall()

    if (out / "catalog").exists():  # `mcs-batch query` (DuckDB over the parts the catalog lists)
        cases = [c for (c,) in query(str(out), "SELECT case_id FROM cases")[1]]
        seen["query"] = (cases, [tuple(r) for r in query(str(out), "SELECT case_id, slice_index FROM slices")[1]])
    seen["duckdb"] = (
        [c for (c,) in duck("cases", "case_id")],
        [tuple(s) for s in duck("slices", "case_id, slice_index")],
    )
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference")
    assert run_child(out, "ref", "", CASES) == 0
    return {c: (out / "masks" / c / "t.nii.gz").read_bytes() for c in CASES}


@pytest.mark.parametrize(
    "point, committed_before",
    [
        ("slices_half_written", 3),  # the second commit never reached its intent: 1 commit stands
        ("cases_half_written", 3),
        ("before_intent", 3),
        ("after_intent", 6),  # the intent is the commit point: the second commit stands (repair publishes it)
        ("between_publish", 6),
        ("during_repair", 6),
    ],
)
def test_a_crash_at_each_point_is_invisible_to_readers_and_repaired(tmp_path, reference, point, committed_before):
    out = tmp_path / "out"
    if point == "during_repair":  # first a crash that leaves a commit to publish, then one inside repair
        assert run_child(out, "r0", "after_intent", CASES) == 137
    assert run_child(out, "r1", point, CASES) == 137

    for reader, (cases, slices) in read_everywhere(out).items():
        assert len(cases) == len(set(cases)), reader
        assert set(cases) <= set(CASES[:committed_before]), (reader, cases)  # nothing uncommitted
        assert set(cases) == set(CASES[:3]) or point in ("after_intent", "between_publish", "during_repair")
        assert len(slices) == len(set(slices)), reader  # never a slice row twice
        assert {c for c, _ in slices} <= set(CASES[:committed_before]), reader
        assert {c for c, _ in slices} >= set(cases), reader  # a case row implies its slice rows

    catalog = Catalog(str(out), owner="r2")
    done = catalog.repair(live="r2")
    dead = "r0" if point == "during_repair" else "r1"  # r1 died inside repair, before writing anything
    assert f"removed staging/{dead}" in done
    committed = {c for c, _ in catalog.committed()}
    assert committed == set(CASES[:committed_before])  # what the intent committed was published, no more
    todo = [c for c in CASES if c not in committed]
    assert run_child(out, "r2", "", todo) == 0

    for reader, (cases, slices) in read_everywhere(out).items():
        assert sorted(cases) == CASES, reader
        assert sorted(slices) == sorted((c, k) for c in CASES for k in range(2)), reader
    assert {c: (out / "masks" / c / "t.nii.gz").read_bytes() for c in CASES} == reference
    assert not list(out.rglob(".tmp-*")), "temporaries of the dead runs are removed"
    assert not (out / "staging").exists() or not any((out / "staging").iterdir())


def test_a_half_written_temporary_in_the_catalog_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "out"
    assert run_child(out, "r1", "", CASES[:3]) == 0
    part = next((out / "catalog" / "cases").glob("part-*.parquet"))
    (part.parent / f".tmp-0123-{part.name}").write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    catalog = Catalog(str(out))
    assert sorted(catalog.committed()) == [(c, "t") for c in CASES[:3]]  # readers skip hidden files
    assert any(".tmp-0123" in d for d in catalog.repair(live="r2"))
    assert not list(out.rglob(".tmp-*"))


SUPERSEDE_CHILD = r"""
import sys
from mcs_batch.faults import TestingConfig, crash_hook
from mcs_batch.outputs.catalog import Catalog
out, run, point = sys.argv[1], sys.argv[2], sys.argv[3]
catalog = Catalog(out, owner=run)
if run == "v1":  # series a, b (two slices each, in part-X) and c (failed, in failed-X), one commit
    rows = [{"case_id": c, "target": "t", "status": "ok", "run_id": run, "instances": "v1"} for c in ("a", "b")]
    rows.append({"case_id": "c", "target": "t", "status": "failed", "run_id": run, "instances": "v1"})
    catalog.commit(run, 0, rows, [{"case_id": c, "target": "t", "slice_index": k, "run_id": run}
                                  for c in ("a", "b") for k in range(2)])
else:  # series b grew to three slices and c to a volume that works: their new rows supersede the old ones
    catalog.crash_hook = crash_hook(TestingConfig(crash_point=point, crash_at_commit=1), lambda: catalog.commits)
    supersede = {key: path for key, (path, _) in catalog.series_rows().items() if key[0] in ("b", "c")}
    rows = [{"case_id": c, "target": "t", "status": "ok", "run_id": run, "instances": "v2"} for c in ("b", "c")]
    catalog.commit(run, 0, rows, [{"case_id": c, "target": "t", "slice_index": k, "run_id": run}
                                  for c, n in (("b", 3), ("c", 1)) for k in range(n)], supersede=supersede)
catalog.end_staging(run)
"""


@pytest.mark.parametrize("point", ["", "after_intent", "between_publish"])
def test_a_superseding_commit_never_shows_two_rows_of_a_pair_and_is_finished_by_repair(tmp_path, point):
    out = tmp_path / "out"
    child = [sys.executable, "-c", SUPERSEDE_CHILD, str(out)]
    assert subprocess.run([*child, "v1", ""], timeout=120).returncode == 0
    assert subprocess.run([*child, "v2", point], timeout=120).returncode == (137 if point else 0)
    for reader, (cases, _) in read_everywhere(out).items():  # slice rows may show twice until repaired
        assert len(cases) == len(set(cases)) and set(cases) <= {"a", "b", "c"}, reader
    Catalog(str(out), owner="r3").repair(live="r3")
    for reader, (cases, slices) in read_everywhere(out).items():
        assert sorted(cases) == ["a", "b", "c"], reader
        assert sorted(slices) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2), ("c", 0)], reader
    rows = {r["case_id"]: r for r in Catalog(str(out)).cases(["case_id", "run_id", "status"]).to_pylist()}
    assert {c: (r["run_id"], r["status"]) for c, r in rows.items()} == {"a": ("v1", "ok"), "b": ("v2", "ok"),
                                                                          "c": ("v2", "ok")}  # fmt: skip
