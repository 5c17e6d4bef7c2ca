"""Sharded drivers (pipeline/shards.py): how the archive is cut, what each shard driver owns, and, on
a multi-node local cluster, that N drivers give exactly the rows of one, a killed driver is restarted
and its shard resumes, and a series whose files span two listing prefixes is one case."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mcs_batch.archive.listing import Wave, shard_waves
from mcs_batch.config import ResourcesConfig
from mcs_batch.errors import ConfigError
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.pipeline.resources import drivers_for, resolve
from mcs_batch.testdata.series import write_series
from tests.pipeline.sharded import RESULT

REPO = Path(__file__).resolve().parents[2]


def test_shards_are_contiguous_balanced_and_cover_every_wave_once():
    waves = [Wave(i, f"w{i}", n, 0) for i, n in enumerate([5, 1, 1, 6, 2, 2, 7, 1])]
    for shards in (1, 2, 3, 4, 8, 11):
        owned = []
        for i in range(shards):
            part = shard_waves(waves, i, shards)
            mine = [w.path for w in part.waves[part.own[0] : part.own[1]]]
            owned += mine
            assert part.objects == sum(w.objects for w in part.waves[part.own[0] : part.own[1]])
            assert [w.index for w in part.waves] == list(range(len(part.waves)))  # renumbered for the grouper
            if mine:  # the wave before and the two after are read too, where there are such
                first, last = int(mine[0][1:]), int(mine[-1][1:])
                assert part.waves[0].path == f"w{max(0, first - 1)}"
                assert part.waves[-1].path == f"w{min(len(waves) - 1, last + 2)}"
                assert part.unread_after == (last + 2 < len(waves) - 1)
        assert owned == [w.path for w in waves]  # every wave owned once, in order
    sizes = [shard_waves(waves, i, 3).objects for i in range(3)]
    assert sizes == [7, 10, 8]  # cut at the wave boundaries nearest to 1/3 and 2/3
    again = [shard_waves(list(waves), i, 3) for i in range(3)]
    assert again == [shard_waves(waves, i, 3) for i in range(3)]  # deterministic


def test_shard_settings_are_checked_and_split_the_cluster():
    assert ResourcesConfig(shard="2/4").shard_spec() == (1, 4)
    assert ResourcesConfig().shard_spec() is None
    for bad in ("0/2", "3/2", "x/2", "2", "1/0"):
        with pytest.raises(ConfigError, match=r"resources\.shard"):
            ResourcesConfig(shard=bad)
    with pytest.raises(ConfigError, match=r"resources\.drivers"):
        ResourcesConfig(drivers=0)
    cluster = {"cpus": 64.0, "gpus": 8.0, "memory": 512e9, "nodes": 9, "gpu_nodes": 8}
    gpus = [resolve(ResourcesConfig(), cluster, (i, 3)).gpus for i in range(3)]
    assert gpus == [2.0, 3.0, 3.0] and sum(gpus) == 8  # whole GPUs, none left idle
    assert resolve(ResourcesConfig(), cluster).gpus == 8
    assert drivers_for(ResourcesConfig(), {**cluster, "gpus": 0.0}) == 1  # no GPU: one driver
    assert drivers_for(ResourcesConfig(), {**cluster, "gpus": 100.0}) > drivers_for(ResourcesConfig(), cluster)
    assert drivers_for(ResourcesConfig(drivers=5), cluster) == 5


IMAGES = 8


def cohort(folder: Path) -> Path:
    """Six top-level prefixes (each listed by its own task, each its own wave): 8 PNG images in four,
    and one CT series of 6 files whose first 3 are in c_ct/ and last 3 in d_ct/. With 2 shards the cut
    falls between c_ct/ and d_ct/ (7 objects either side)."""
    rng = np.random.default_rng(5)
    for n, name in enumerate(("a_img", "b_img", "e_img", "f_img")):
        (folder / name).mkdir(parents=True)
        for i in range(IMAGES // 4):
            img = rng.integers(0, 40, (32, 40), dtype=np.uint8)
            img[8:20, 6 + 3 * i + n : 24 + 3 * i + n] = 230
            Image.fromarray(img).save(folder / name / f"img{i}.png")
    write_series(folder / "c_ct", rows=24, cols=24, n_slices=6, series_seed="spans-two-prefixes")
    (folder / "d_ct").mkdir()
    for path in sorted((folder / "c_ct").iterdir())[3:]:
        shutil.move(path, folder / "d_ct" / path.name)
    return folder


def masks(out: Path) -> dict[tuple[str, str], tuple[str, int, np.ndarray | None]]:
    """(case, target) -> status, slices, the mask (None for a failure); asserting each pair is once."""
    rows = Catalog(str(out)).cases().to_pylist()
    pairs = [(r["case_id"], r["target"]) for r in rows]
    assert len(pairs) == len(set(pairs))
    got = {}
    for r in rows:
        mask = None
        if r["mask_uri"]:
            data = gzip.decompress(Path(r["mask_uri"].removeprefix("file://")).read_bytes())
            mask = np.asarray(nib.Nifti1Image.from_bytes(data).dataobj)
        got[(r["case_id"], r["target"])] = (r["status"], r["n_slices"], mask)
    return got


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k][:2] == b[k][:2] and (a[k][2] is None) == (b[k][2] is None) and np.array_equal(a[k][2], b[k][2])
        for k in a
        if a[k][2] is not None or b[k][2] is not None
    )


def test_sharded_drivers_give_the_rows_of_one_driver_and_a_killed_one_resumes(tmp_path: Path):
    inputs, work = cohort(tmp_path / "in"), tmp_path / "work"
    tmp = Path("/tmp") / f"mcsb-{os.getpid()}-{tmp_path.name[-12:]}"  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tests.pipeline.sharded", str(inputs), str(work), str(tmp_path.parent / "model-cache"),
           str(tmp)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith(RESULT)).removeprefix(RESULT))

    reference = masks(work / "one")
    assert result["one"]["by_status"] == {"ok": IMAGES + 1} and len(reference) == IMAGES + 1  # and the series
    series = [k for k, v in reference.items() if v[1] == 6]
    assert len(series) == 1  # the series, its 6 files in two prefixes, is one case
    keys = Catalog(str(work / "one")).cases().to_pylist()
    spans = next(r["source_keys"] for r in keys if r["case_id"] == series[0][0])
    assert {k.split("/")[-2] for k in spans} == {"c_ct", "d_ct"}

    for name in ("two", "three", "separate"):
        assert same(masks(work / name), reference), name  # the same pairs, statuses, slices and masks
    run = json.loads((work / "two" / "runs" / f"{result['two']['run_id']}.json").read_text())
    assert run["status"] == "succeeded" and len(run["shards"]) == 2 and run["counts"]["cases"] == IMAGES + 1
    for entry in run["shards"]:
        shard = json.loads((work / "two" / "runs" / f"{entry['runs'][0]}.json").read_text())
        assert shard["status"] == "succeeded" and shard["shard"] == {"shard": entry["shard"], "parent": run["run_id"]}
        assert "maintenance" not in shard and "weak_jobs" not in shard  # once per job: by the parent
    assert "maintenance" in run and run["tables"]["cases"]["last"] >= run["tables"]["cases"]["first"]
    owner = [json.loads((work / "two" / "runs" / f"{e['runs'][0]}.json").read_text()) for e in run["shards"]]
    assert [o["attempts"][0]["listing"]["shard"]["objects"] for o in owner] == [7, 7]  # cut between c_ct and d_ct
    listed = run["listing"]  # the parent listed once; every shard cut that listing
    assert listed["objects"] == 14 and [o["listing"]["listed_by"] for o in owner] == ["parent", "parent"]
    assert all(o["listing"]["objects"] == listed["objects"] and o["listing"]["waves"] == listed["waves"] for o in owner)
    assert not (work / "two" / "staging" / run["run_id"]).exists()  # the parent's listing removed at its end
    assert sorted(r["cases"] for r in result["separate"]) == [4, 5]  # two --shard jobs: each its share, once

    three = result["three"]  # 3 drivers, one killed once the first commit landed: restarted, resumed
    assert three["killed"], "the killer found no shard driver to kill"
    run = json.loads((work / "three" / "runs" / f"{three['run_id']}.json").read_text())
    assert run["status"] == "succeeded" and len(run["shards"]) == 3
    restarted = [s for s in run["shards"] if s["restarts"]]
    assert len(restarted) == 1 and len(restarted[0]["runs"]) == 2
    dead = json.loads((work / "three" / "runs" / f"{restarted[0]['runs'][0]}.json").read_text())
    assert dead["status"] == "failed" and "shard driver died" in dead["reason"]
    assert any("restarting it as a new run" in line for line in three["progress"])
    assert not list((work / "three" / "locks").glob("run-*.json"))  # no heartbeat left behind
