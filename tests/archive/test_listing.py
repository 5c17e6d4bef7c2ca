"""Listing in waves: cut only between folders, every object once, the index reused when unchanged."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mcs_batch.archive.listing import Prefix, list_prefix, split_into_waves, top_prefixes
from mcs_batch.errors import ConfigError
from mcs_batch.outputs.index import ArchiveIndex


def rows(*folders: tuple[str, int]) -> list[dict]:
    return [{"rel": f"{name}/f{i:03d}"} for name, n in folders for i in range(n)]


def test_waves_are_cut_between_folders_where_they_can():
    waves = split_into_waves(rows(("a", 3), ("b", 4), ("c", 1), ("d", 5)), wave_objects=4)
    assert [[r["rel"].split("/")[0] for r in w] for w in waves] == [
        ["a"] * 3 + ["b"] * 4,  # 'a' alone is under 4: the wave takes the whole next folder
        ["c"] + ["d"] * 5,
    ]
    big = split_into_waves(rows(("a", 10)), wave_objects=4)
    assert [len(w) for w in big] == [8, 2]  # a big folder is cut at twice the wave size
    assert sum(len(w) for w in split_into_waves(rows(("a", 3), ("b", 20)), 4)) == 23
    assert split_into_waves([], 4) == []


def test_top_prefixes_name_every_unit_and_refuse_a_missing_input(tmp_path: Path):
    (tmp_path / "in" / "x").mkdir(parents=True)
    (tmp_path / "in" / "y" / "z").mkdir(parents=True)
    (tmp_path / "in" / "top.png").write_bytes(b"1")
    prefixes = top_prefixes([str(tmp_path / "in")], storage=None)
    assert [(Path(p.path).name, p.recursive) for p in prefixes] == [("in", False), ("x", True), ("y", True)]
    assert len({p.prefix_id for p in prefixes}) == 3
    again = top_prefixes([str(tmp_path / "in")], storage=None)
    assert [p.prefix_id for p in again] == [p.prefix_id for p in prefixes]  # stable across runs
    with pytest.raises(ConfigError, match="does not exist"):
        top_prefixes([str(tmp_path / "nope")], storage=None)


def test_listing_reuses_the_index_for_unchanged_objects(tmp_path: Path):
    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"{i}.txt").write_text("x" * (i + 1))
    prefix = top_prefixes([str(tmp_path / "in")], storage=None)[0]
    assert prefix.recursive and isinstance(prefix, Prefix)
    kwargs = {"storage": None, "include": (), "exclude": (), "wave_objects": 10, "index_uri": str(tmp_path / "index")}
    first = list_prefix(prefix.to_dict(), staging_uri=str(tmp_path / "s1"), **kwargs)
    assert [w["objects"] for w in first] == [5] and first[0]["cached"] == 0  # one folder: one wave
    wave = pq.read_table(first[0]["path"].removeprefix("file://")).to_pylist()
    ArchiveIndex(str(tmp_path / "index")).append(
        prefix.prefix_id, [{**r, "payload": '{"record": {}}', "case_id": "c"} for r in wave[:3]], run_id="r1", seq=0
    )
    (folder / "0.txt").write_text("changed!")  # a changed object is read again
    second = list_prefix(prefix.to_dict(), staging_uri=str(tmp_path / "s2"), **kwargs)
    assert second[0]["cached"] == 2  # 1.txt and 2.txt are known and unchanged
    listed = pq.read_table(second[0]["path"].removeprefix("file://")).to_pylist()
    assert [bool(r["payload"]) for r in listed] == [False, True, True, False, False]


def test_a_process_that_listed_the_archive_before_sees_what_arrived_since(s3_bucket, s3_server):
    """A worker process lives on between jobs (Ray keeps idle workers; sharded drivers share them):
    objects that arrived after its last listing are listed, read, and a new top-level prefix found."""
    from mcs_batch.io.storage import StorageOptions, fetch_bytes, filesystem_for

    bucket, other = s3_bucket  # `other`: another client, as the scanner or a PACS export writes
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    root = f"s3://{bucket}/cohort"
    other.pipe_file(f"{bucket}/cohort/ct/a.dcm", b"first")
    fs, _ = filesystem_for(root, storage)
    assert fs.find(f"{bucket}/cohort/ct") == [f"{bucket}/cohort/ct/a.dcm"]
    assert [p.path for p in top_prefixes([root], storage=storage)] == [f"{bucket}/cohort/ct"]
    other.pipe_file(f"{bucket}/cohort/ct/b.dcm", b"late")  # arrives after this process listed
    other.pipe_file(f"{bucket}/cohort/mr/c.dcm", b"new prefix")
    assert fetch_bytes(fs, f"s3://{bucket}/cohort/ct/b.dcm") == b"late"
    assert fs.info(f"{bucket}/cohort/ct/b.dcm")["size"] == 4
    assert [p.path for p in top_prefixes([root], storage=storage)] == [f"{bucket}/cohort/ct", f"{bucket}/cohort/mr"]
