"""Folder transfers against a real S3 endpoint (moto's server): counts and bytes, concurrent requests
bounded by `connections`, resumed downloads, a filter, errors naming the file, one download per node."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import s3fs

from mcs_batch.io.storage import StorageOptions
from mcs_batch.train.weak.files import TransferError, download_folder, upload_folder
from mcs_batch.train.weak.worker_data import fetch_preprocessed, training_files

PLANS = {  # the part of nnU-Net's plans training_files reads (PlansManager resolves "inherits_from")
    "dataset_name": "Dataset501_x", "plans_name": "nnUNetPlans",
    "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "architecture": {}},
                       "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "architecture": {}},
                       "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres"}},
}  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_s3_instances():
    """Instances made while a test counted requests keep its counter: none survive the test."""
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def _folder(root: Path, n: int) -> dict[str, int]:
    """n small files in two subfolders; returns relative path -> size."""
    sizes = {}
    for i in range(n):
        rel = f"{'a' if i % 2 else 'b'}/f{i:03d}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bytes([i % 251]) * (100 + i))
        sizes[rel] = 100 + i
    return sizes


class InFlight:
    """Counts the S3 requests of s3fs' `_get_file` / `_put_file` in flight together (its event loop)."""

    def __init__(self, monkeypatch, name: str, fail_on: str = ""):
        self.now = self.peak = self.calls = 0
        self.lock = threading.Lock()
        original = getattr(s3fs.S3FileSystem, name)

        async def counted(fs, *args, **kwargs):
            with self.lock:
                self.now += 1
                self.calls += 1
                self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(0.02)  # each request takes a while, as a real store's would
                if fail_on and fail_on in str(args[0]):
                    raise OSError("testing: the store refused")
                return await original(fs, *args, **kwargs)
            finally:
                with self.lock:
                    self.now -= 1

        monkeypatch.setattr(s3fs.S3FileSystem, name, counted)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance binds its sync methods when it is made


def test_upload_then_download_in_parallel_with_counts_bytes_and_a_bound(tmp_path, s3_server, s3_bucket, monkeypatch):
    bucket, fs = s3_bucket
    storage = StorageOptions(**s3_server)
    sizes = _folder(tmp_path / "src", 40)
    puts = InFlight(monkeypatch, "_put_file")
    up = upload_folder(tmp_path / "src", f"s3://{bucket}/data", storage, connections=6)
    assert (up.files, up.transferred, up.bytes) == (40, 40, sum(sizes.values()))
    assert puts.calls == 40 and 2 <= puts.peak <= 6
    assert sorted(p.split("/data/", 1)[1] for p in fs.find(f"{bucket}/data")) == sorted(sizes)

    gets = InFlight(monkeypatch, "_get_file")
    down = download_folder(f"s3://{bucket}/data", tmp_path / "dst", storage, connections=4)
    assert (down.files, down.transferred, down.bytes, down.skipped) == (40, 40, sum(sizes.values()), 0)
    assert gets.calls == 40 and 2 <= gets.peak <= 4  # parallel, and never more than asked
    for rel, size in sizes.items():
        assert (tmp_path / "dst" / rel).read_bytes() == (tmp_path / "src" / rel).read_bytes() and size
    assert not (tmp_path / ".dst.partial").exists()

    sequential = InFlight(monkeypatch, "_get_file")
    download_folder(f"s3://{bucket}/data", tmp_path / "one", storage, connections=1)
    assert sequential.calls == 40 and sequential.peak == 1


def test_download_resumes_filters_and_names_the_failing_file(tmp_path, s3_server, s3_bucket, monkeypatch):
    bucket, _ = s3_bucket
    storage = StorageOptions(**s3_server)
    sizes = _folder(tmp_path / "src", 12)
    upload_folder(tmp_path / "src", f"s3://{bucket}/data", storage)
    local = tmp_path / "dst"
    download_folder(f"s3://{bucket}/data", local, storage)
    (local / "a/f001.bin").unlink()
    (local / "b/f002.bin").write_bytes(b"short")  # a partial copy: the wrong size
    again = download_folder(f"s3://{bucket}/data", local, storage)
    assert (again.transferred, again.skipped, again.bytes) == (2, 10, sizes["a/f001.bin"] + sizes["b/f002.bin"])
    assert (local / "b/f002.bin").read_bytes() == (tmp_path / "src/b/f002.bin").read_bytes()

    only_a = download_folder(f"s3://{bucket}/data", tmp_path / "a-only", storage, keep=lambda r: r.startswith("a/"))
    assert (only_a.files, only_a.left_out) == (6, 6)
    assert sorted(p.parent.name for p in (tmp_path / "a-only").rglob("*.bin")) == ["a"] * 6

    InFlight(monkeypatch, "_get_file", fail_on="f007.bin")
    with pytest.raises(TransferError, match=rf"s3://{bucket}/data/a/f007.bin: download to .* failed .*refused"):
        download_folder(f"s3://{bucket}/data", tmp_path / "broken", storage)
    assert not list((tmp_path / "broken").rglob("*.part")) and not (tmp_path / "broken/a/f007.bin").exists()


def test_training_files_are_the_configurations_data_plans_and_dataset_jsons():
    keep = training_files(PLANS, "2d", "nnUNetPlans")
    kept = ["nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json", "nnUNetPlans_2d/case_0000.b2nd",
            "nnUNetPlans_2d/case_0000_seg.b2nd", "nnUNetPlans_2d/case_0000.pkl"]  # fmt: skip
    left = ["gt_segmentations/case_0000.png", "splits_final.json", "mcs_batch_prepared.json",
            "nnUNetPlans_3d_fullres/case_0000.b2nd", "nnUNetPlans_2d_extra/x.b2nd", "otherPlans.json"]  # fmt: skip
    assert [r for r in kept + left if keep(r)] == kept
    assert training_files(PLANS, "3d_lowres", "nnUNetPlans")("nnUNetPlans_3d_lowres/c.b2nd")


def test_two_workers_of_a_node_share_one_download(tmp_path, s3_server, s3_bucket, monkeypatch):
    """Two workers start together on one cache folder: one downloads the training's files, the other
    waits on the lock and finds them all there; gt_segmentations and other configurations stay behind."""
    import json

    bucket, _ = s3_bucket
    storage = StorageOptions(**s3_server)
    src = tmp_path / "pre"
    _folder(src / "nnUNetPlans_2d", 10)
    _folder(src / "gt_segmentations", 4)
    _folder(src / "nnUNetPlans_3d_fullres", 4)
    for name in ("dataset.json", "dataset_fingerprint.json", "splits_final.json"):
        (src / name).write_text("{}")
    (src / "nnUNetPlans.json").write_text(json.dumps(PLANS))
    uri = f"s3://{bucket}/work/nnUNet_preprocessed/Dataset501_x"
    upload_folder(src, uri, storage)
    gets = InFlight(monkeypatch, "_get_file")
    dataset = tmp_path / "cache" / "nnUNet_preprocessed" / "Dataset501_x"
    reports = [None, None]

    def worker(i: int) -> None:
        reports[i] = fetch_preprocessed(uri, dataset, storage, plans_name="nnUNetPlans", configuration="2d",
                                        connections=4)  # fmt: skip

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = sorted(reports, key=lambda r: -r.transferred)
    assert (first.files, first.transferred, first.left_out) == (13, 13, 9)  # 10 data files + 3 jsons
    assert (second.transferred, second.bytes, second.skipped) == (0, 0, 13)
    assert gets.calls == 13
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "dataset_fingerprint.json",
                                                         "nnUNetPlans.json", "nnUNetPlans_2d"]  # fmt: skip


def test_cache_folders_of_trainings_not_fetched_for_a_week_are_removed(tmp_path):
    """A node kept for years of nightly retrainings: each training's files sit in a cache folder of their
    own; a fetch removes the folders of other trainings whose last fetch is older than CACHE_KEEP_S."""
    import os

    from mcs_batch.train.weak.worker_data import CACHE_KEEP_S, USED_FILE, prune_cache

    root = tmp_path / "mcs-weak-preprocessed"
    now = 1_000_000_000.0
    ages = {"current": 0, "yesterday": 86400, "old": CACHE_KEEP_S + 60, "unmarked-old": CACHE_KEEP_S + 60}
    for name, age in ages.items():
        (root / name / "nnUNet_preprocessed").mkdir(parents=True)
        if name != "unmarked-old":
            (root / name / USED_FILE).touch()
            os.utime(root / name / USED_FILE, (now - age, now - age))
        os.utime(root / name, (now - age, now - age))
    os.utime(root / "current" / USED_FILE, (now - 10 * CACHE_KEEP_S,) * 2)  # the folder in use is never removed
    removed = prune_cache(root, keep=root / "current", now=now)
    assert removed == ["old", "unmarked-old"]
    assert sorted(p.name for p in root.iterdir()) == ["current", "yesterday"]
