"""Streaming grouping of probed objects into cases: series released once complete, by waves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from mcs_batch.archive.grouping import CaseGrouper
from mcs_batch.archive.listing import WAVE_SCHEMA
from mcs_batch.archive.probe import probe_refs
from mcs_batch.io.discover import list_objects
from mcs_batch.outputs.index import ArchiveIndex
from mcs_batch.testdata.series import write_series


def probe_rows(root: Path, files: list[Path], wave: int) -> pa.Table:
    """Probe rows as archive/probe.py emits them, for these files, tagged with a wave."""
    refs = [r for r in list_objects([str(root)]) if Path(r.uri.removeprefix("file://")) in set(files)]
    payloads = probe_refs(refs, storage=None, threads=1)
    rows = [{"uri": r.uri, "rel": r.rel, "size": r.size, "version": "v1", "prefix_id": "p0", "payload": p}
            for r, p in zip(refs, payloads, strict=True)]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=WAVE_SCHEMA)
    table = table.append_column("wave", pa.array([wave] * len(rows), pa.int64()))
    table = table.append_column("probed", pa.array([True] * len(rows)))
    return table.append_column("probed_at", pa.array([0.0] * len(rows)))


def archive(root: Path) -> dict[str, list[Path]]:
    files = {
        "a1": write_series(root / "a1", n_slices=3, series_seed="A", prefix="a"),  # one series in two folders
        "a2": [],
        "b": write_series(root / "b", n_slices=4, series_seed="B"),
        "c": write_series(root / "c", n_slices=3, series_seed="C"),
    }
    moved = []
    for p in files["a1"][1:]:  # 2 of series A's 3 files to the neighbouring folder
        target = root / "a2" / p.name
        target.parent.mkdir(exist_ok=True)
        p.rename(target)
        moved.append(target)
    files["a1"], files["a2"] = files["a1"][:1], moved
    (root / "png").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "png" / "x.png")
    files["png"] = [root / "png" / "x.png"]
    return files


def test_series_are_released_once_complete_and_singles_at_once(tmp_path: Path):
    root = tmp_path / "in"
    f = archive(root)
    c_late = f["c"][-1]
    waves = [
        f["a1"] + f["b"] + f["c"][:-1],  # wave 0
        f["a2"],  # wave 1: the rest of series A
        f["png"],  # wave 2
        [c_late],  # wave 3: a file of series C far from the others
    ]
    grouper = CaseGrouper([len(w) for w in waves], index_uri=str(tmp_path / "index"), run_id="r1")
    out0 = grouper(probe_rows(root, waves[0], 0)).to_pylist()
    assert out0 == []  # nothing released: series may continue in wave 1
    out1 = grouper(probe_rows(root, waves[1], 1)).to_pylist()
    # wave 1 is done: B and C (last seen in wave 0) are released; A continues into wave 1, so it waits
    assert sorted(len(r["source_uris"]) for r in out1) == [2, 4]
    out2 = grouper(probe_rows(root, waves[2], 2)).to_pylist()
    # the PNG is a case of its own, at once; wave 2 is done without series A: A is released, with all
    # 3 of its files from two folders
    assert sorted((r["kind"], len(r["source_uris"])) for r in out2) == [("dicom_series", 3), ("image", 1)]
    out3 = grouper(probe_rows(root, waves[3], 3)).to_pylist()
    # C's far file is a failure row, never a second case with C's id
    assert [(r["kind"], r["status"], len(r["source_uris"])) for r in out3] == [("dicom_series", "failed", 1)]
    late = out3[0]
    assert late["error_code"] == "inconsistent_series" and "far" in late["error_message"]
    every = out1 + out2 + out3
    assert sorted(u for r in every for u in r["source_uris"]) == sorted(
        f"file://{p}" for w in waves for p in w
    )  # every object in exactly one row
    index = ArchiveIndex(str(tmp_path / "index")).read_prefix("p0")
    assert len(index) == sum(len(w) for w in waves)
    case_of = {u: r["case_id"] for r in every for u in r["source_uris"]}
    assert all(index[u]["case_id"] == case_of[u] for u in index)  # the index knows each object's case


def test_committed_cases_are_dropped_and_partial_ones_carry_their_done_targets(tmp_path: Path):
    from mcs_batch.outputs.catalog import Catalog

    root = tmp_path / "in"
    (root / "png").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "png" / f"{i}.png")
    files = sorted((root / "png").glob("*.png"))
    first = CaseGrouper([3], index_uri=str(tmp_path / "index"), run_id="r1")(probe_rows(root, files, 0)).to_pylist()
    ids = [r["case_id"] for r in first]
    out = tmp_path / "out"
    Catalog(str(out)).commit("r0", 0, [{"case_id": ids[0], "target": "a", "status": "ok"},
                                       {"case_id": ids[0], "target": "b", "status": "ok"},
                                       {"case_id": ids[1], "target": "a", "status": "failed"}], [])  # fmt: skip
    grouper = CaseGrouper([3], index_uri=str(tmp_path / "index"), run_id="r2", committed_out=str(out),
                          targets=("a", "b"))  # fmt: skip
    rows = {r["case_id"]: r["done_targets"] for r in grouper(probe_rows(root, files, 0)).to_pylist()}
    assert rows == {ids[1]: ["a"], ids[2]: []}  # case 0 is done; case 1 still needs target b


def test_a_grown_series_and_a_retried_failure_name_the_rows_they_replace(tmp_path: Path):
    """The grouper reads the catalog once (committed_state) and hands on, in the case row, which
    committed row each redone target replaces (`redo`): the driver never loads the catalog."""
    import json

    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.records import CaseRecord, instances_digest

    root = tmp_path / "in"
    grown = write_series(root / "b", n_slices=4, series_seed="B")
    same = write_series(root / "c", n_slices=3, series_seed="C")
    first = CaseGrouper([7], index_uri=str(tmp_path / "index"), run_id="r1")(probe_rows(root, grown + same, 0))
    by_files = {len(r["source_uris"]): r for r in first.to_pylist()}
    b, c = by_files[4], by_files[3]
    out = tmp_path / "out"
    rows = [{"case_id": b["case_id"], "target": t, "status": "ok", "instances": "digest-of-3-files", "run_id": "r0"}
            for t in "ab"]  # fmt: skip
    rows += [{"case_id": c["case_id"], "target": "a", "status": "failed", "error_code": "unreadable",
              "error_message": "503", "attempts": 1, "instances": instances_digest(CaseRecord.from_row(c)),
              "run_id": "r0"}]  # fmt: skip
    Catalog(str(out)).commit("r0", 0, rows, [])
    grouper = CaseGrouper([7], index_uri=str(tmp_path / "index"), run_id="r2", committed_out=str(out),
                          targets=("a",))  # fmt: skip
    kept = {r["case_id"]: r for r in grouper(probe_rows(root, grown + same, 0)).to_pylist()}
    assert set(kept) == {b["case_id"], c["case_id"]}
    assert kept[b["case_id"]]["done_targets"] == []  # B grew: redone, its row replaced
    assert json.loads(kept[b["case_id"]]["redo"]) == {"a": {"replaces": "r0", "attempts": 0, "history": []}}
    assert json.loads(kept[c["case_id"]]["redo"]) == {  # C's transient failure: retried, its history kept
        "a": {"replaces": "r0", "attempts": 1, "history": ["attempt 1 (r0): unreadable: 503"]}}


def unreadable_row(root: Path, name: str, wave: int) -> pa.Table:
    """The probe row of an object storage failed to read (as archive/probe.py emits it: a failed
    record, `unreadable`), lying at root/name."""
    import json

    from mcs_batch.records import CaseKind, failed_record

    uri, rel = f"file://{root / name}", f"{root.name}/{name}"
    record = failed_record(f"file:{rel}", CaseKind.UNKNOWN, uri, rel, "unreadable", f"{uri}: cannot read (503)")
    row = {"uri": uri, "rel": rel, "size": 4096, "version": "v1", "prefix_id": "p0",
           "payload": json.dumps({"record": record.to_row()})}  # fmt: skip
    table = pa.Table.from_pylist([row], schema=WAVE_SCHEMA)
    table = table.append_column("wave", pa.array([wave], pa.int64()))
    return table.append_column("probed", pa.array([True])).append_column("probed_at", pa.array([0.0]))


def test_a_series_beside_an_unreadable_object_fails_as_transient_and_the_failed_read_is_not_indexed(tmp_path: Path):
    """Failed reads are never data: a series volume whose folder holds an object storage could not read
    is not assembled from the files that were read (ok with a slice missing, for good), it fails
    `unreadable`; the index keeps neither that failure nor a too-large verdict, so the next run reads
    the object again. A series in another folder is unaffected."""
    root = tmp_path / "in"
    read = write_series(root / "ct", n_slices=5, series_seed="S")
    other = write_series(root / "mr", n_slices=3, series_seed="M")
    grouper = CaseGrouper([len(read) + 1 + len(other)], index_uri=str(tmp_path / "index"), run_id="r1")
    out = grouper(pa.concat_tables([probe_rows(root, read + other, 0), unreadable_row(root, "ct/slice9999", 0)]))
    rows = {(len(r["source_uris"]), r["kind"]): r for r in out.to_pylist()}
    series, member = rows[(5, "dicom_series")], rows[(1, "unknown")]
    assert (series["status"], series["error_code"]) == ("failed", "unreadable")
    assert "in/ct/slice9999" in series["error_message"] and "next run" in series["error_message"]
    assert (member["status"], member["error_code"]) == ("failed", "unreadable")
    assert rows[(3, "dicom_series")]["status"] == "ok"  # another folder
    index = ArchiveIndex(str(tmp_path / "index")).read_prefix("p0")
    assert f"file://{root / 'ct/slice9999'}" not in index and len(index) == len(read) + len(other)


def test_one_bad_row_fails_its_object_and_the_block_goes_on(tmp_path: Path):
    """A probe row no code path expects (here: a payload that is not JSON) fails that object alone."""
    root = tmp_path / "in"
    files = write_series(root / "ct", n_slices=3, series_seed="S")
    table = probe_rows(root, files, 0)
    payloads = table.column("payload").to_pylist()
    payloads[1] = "{not json"
    table = table.set_column(table.schema.get_field_index("payload"), "payload", pa.array(payloads, pa.string()))
    out = CaseGrouper([3], index_uri=str(tmp_path / "index"), run_id="r1")(table).to_pylist()
    assert sorted((r["status"], r["error_code"], len(r["source_uris"])) for r in out) == [
        ("failed", "internal_error", 1),
        ("ok", None, 2),
    ]


def test_two_shards_own_every_object_once_and_a_series_across_the_cut_is_one_case(tmp_path: Path):
    """Shard groupers (listing.ShardWaves): the cut between waves 1 and 2 falls inside series A (a1 | a2).
    Shard 1 owns waves 0-1 and reads 2-3 after them; shard 2 owns waves 2-3 and reads wave 1 before
    them. A is shard 1's (its first file is in wave 1), assembled whole from the wave after the cut;
    shard 2 leaves it, and nothing is indexed twice."""
    root = tmp_path / "in"
    f = archive(root)
    d = write_series(root / "d", n_slices=2, series_seed="D")
    waves = [f["b"] + f["c"], f["a1"], f["a2"] + f["png"], d]
    sizes = [len(w) for w in waves]
    first = CaseGrouper(sizes, index_uri=str(tmp_path / "index1"), run_id="s1", own=(0, 2))
    second = CaseGrouper(sizes[1:], index_uri=str(tmp_path / "index2"), run_id="s2", own=(1, 3))
    out1 = [r for n, w in enumerate(waves) for r in first(probe_rows(root, w, n)).to_pylist()]
    out2 = [r for n, w in enumerate(waves[1:]) for r in second(probe_rows(root, w, n)).to_pylist()]
    objects = sorted(u for r in out1 + out2 for u in r["source_uris"])
    assert objects == sorted(f"file://{p}" for w in waves for p in w)  # every object in exactly one row
    series_a = [r for r in out1 + out2 if any("/a1/" in u for u in r["source_uris"])]
    assert len(series_a) == 1 and series_a[0] in out1 and len(series_a[0]["source_uris"]) == 3
    assert series_a[0]["status"] == "ok"
    assert {u.split("/")[-2] for r in out2 for u in r["source_uris"]} == {"png", "d"}  # shard 2: its own only
    assert sorted(len(r["source_uris"]) for r in out1) == [3, 3, 4]  # shard 1: series A (whole), B and C
    indexed = [*ArchiveIndex(str(tmp_path / "index1")).read_prefix("p0"),
               *ArchiveIndex(str(tmp_path / "index2")).read_prefix("p0")]  # fmt: skip
    assert sorted(indexed) == objects  # each object indexed once, by its owner


def test_a_shards_series_that_may_go_on_past_what_it_reads_fails_naming_the_cut(tmp_path: Path):
    root = tmp_path / "in"
    files = write_series(root / "s", n_slices=4, series_seed="LONG")
    waves = [files[:1], files[1:2], files[2:3]]  # shard 1 owns wave 0, reads 1-2; the archive goes on after
    grouper = CaseGrouper([1, 1, 1], index_uri=str(tmp_path / "index"), run_id="s1", own=(0, 1), unread_after=True)
    out = [r for n, w in enumerate(waves) for r in grouper(probe_rows(root, w, n)).to_pylist()]
    assert [(r["status"], r["error_code"]) for r in out] == [("failed", "inconsistent_series")]
    assert "past the waves read after this shard's cut" in out[0]["error_message"]
