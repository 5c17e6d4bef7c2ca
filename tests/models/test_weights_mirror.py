"""Weight caches filled from a mirror on a real S3 endpoint (moto server mode): the pods' init step.

The job config is the shipped nightly one (jobs/configs/lung_ct.yaml: hf-hub: and https:// weights).
This machine cannot download those, so the "machine with network access" cache is written through
the cache's own entry writer (`materialise`, which `fetch` uses for both schemes) with the tiny
BiomedCLIP folder and a stand-in SAM file; everything after that is the code the pods run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcs_batch.config import BIOMEDCLIP_HF, SAM_VIT_B_URL
from mcs_batch.models.weights import WeightsError, cache_key, digest_files, fetch, materialise, sha256_file
from mcs_batch.models.weights_mirror import mirror, mirror_path, prefill

REPO = Path(__file__).resolve().parents[2]
LUNG_CT = REPO / "jobs" / "configs" / "lung_ct.yaml"
SAM_NAME = "sam_vit_b_01ec64.pth"
SAM_BYTES = b"stand-in for the SAM vit_b checkpoint\n" * 1000


def _network_cache(cache: Path, clip_folder: Path) -> Path:
    """The cache a machine with network access has after `mcs-batch weights fetch` (see the docstring)."""
    materialise(BIOMEDCLIP_HF, cache, lambda tmp: shutil.copytree(clip_folder, tmp, dirs_exist_ok=True) and None)

    def sam(tmp: Path) -> dict:
        (tmp / SAM_NAME).write_bytes(SAM_BYTES)
        return {"file": SAM_NAME}  # what fetch records for a single object

    materialise(SAM_VIT_B_URL, cache, sam)
    return cache


@pytest.fixture
def mirrored(s3_server, s3_bucket, tmp_path, tiny_biomedclip_folder):
    """s3://BUCKET/models/ holding the lung CT config's two cache entries, written by `mirror`."""
    bucket, fs = s3_bucket
    net = _network_cache(tmp_path / "net-cache", tiny_biomedclip_folder)
    prefix = f"s3://{bucket}/models/"
    for uri in (BIOMEDCLIP_HF, SAM_VIT_B_URL):
        _, target = mirror(uri, to=prefix, cache_dir=net, storage_options=_s3(s3_server))
        assert target == f"s3://{bucket}/models/{cache_key(uri)}"
    return prefix, net, fs


def _s3(server: dict) -> dict:
    return {"key": server["key"], "secret": server["secret"], "client_kwargs": {"endpoint_url": server["endpoint_url"]}}


def _cli(args: list[str], server: dict) -> subprocess.CompletedProcess:
    env = os.environ | {"AWS_ACCESS_KEY_ID": server["key"], "AWS_SECRET_ACCESS_KEY": server["secret"],
                        "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
    command = [sys.executable, "-m", "mcs_batch.cli", "weights", *args, "--endpoint-url", server["endpoint_url"]]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def _prefill(cache: Path, prefix: str, server: dict, *sets: str) -> subprocess.CompletedProcess:
    overrides = [a for s in [f"models.cache_dir={cache}", *sets] for a in ("--set", s)]
    return _cli(["prefill", "--config", str(LUNG_CT), "--from", prefix, *overrides], server)


def test_mirror_writes_each_cache_entry_under_its_key(mirrored):
    prefix, net, fs = mirrored
    for uri in (BIOMEDCLIP_HF, SAM_VIT_B_URL):
        root = mirror_path(prefix, uri)[len("s3://") :]
        remote = {p[len(root) + 1 :] for p in fs.find(root)}
        local = {
            p.relative_to(net / cache_key(uri)).as_posix() for p in (net / cache_key(uri)).rglob("*") if p.is_file()
        }
        assert remote == local and ".mcs_batch_download.json" in remote
    assert fs.cat(f"{mirror_path(prefix, SAM_VIT_B_URL)[5:]}/{SAM_NAME}") == SAM_BYTES


def test_prefill_copies_the_config_weights_so_the_job_finds_them_offline(mirrored, s3_server, tmp_path):
    prefix, net, _ = mirrored
    pod = tmp_path / "pod-cache"
    run = _prefill(pod, prefix, s3_server)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2
    clip_files = len(digest_files(net / cache_key(BIOMEDCLIP_HF))) + 1  # and the manifest
    assert lines[0].startswith(
        f"clip  {BIOMEDCLIP_HF}  copied {clip_files} file(s) from {prefix}{cache_key(BIOMEDCLIP_HF)}/"
    )
    assert lines[1].startswith(f"sam   {SAM_VIT_B_URL}  copied 2 file(s) from ")
    # What the job's actors do: fetch by the config's URIs, the cache only (no network on this machine).
    clip = fetch(BIOMEDCLIP_HF, cache_dir=pod)
    assert clip.local_path == pod / cache_key(BIOMEDCLIP_HF)
    assert clip.files == digest_files(net / cache_key(BIOMEDCLIP_HF)) and "open_clip_pytorch_model.bin" in clip.files
    sam = fetch(SAM_VIT_B_URL, cache_dir=pod)
    assert sam.local_path == pod / cache_key(SAM_VIT_B_URL) / SAM_NAME
    assert sam.files == {SAM_NAME: hashlib.sha256(SAM_BYTES).hexdigest()}
    assert f"sha256:{sam.digest}" in lines[1]
    assert not [p for p in pod.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written left


def test_a_second_prefill_copies_nothing_and_needs_no_mirror(mirrored, s3_server, tmp_path):
    prefix, _, fs = mirrored
    pod = tmp_path / "pod-cache"
    assert _prefill(pod, prefix, s3_server).returncode == 0
    stamps = {p: p.stat().st_mtime_ns for p in pod.rglob("*") if p.is_file()}
    fs.rm(prefix[len("s3://") :], recursive=True)  # the mirror is gone: a copy now would fail
    again = _prefill(pod, prefix, s3_server)
    assert again.returncode == 0, again.stderr
    assert [line.split("  ")[2] for line in again.stdout.splitlines()] == ["in the cache already"] * 2
    assert {p: p.stat().st_mtime_ns for p in pod.rglob("*") if p.is_file()} == stamps


def test_an_entry_missing_from_the_mirror_is_one_error_line_and_exit_2(mirrored, s3_server, tmp_path):
    prefix, _, fs = mirrored
    fs.rm(mirror_path(prefix, SAM_VIT_B_URL)[len("s3://") :], recursive=True)
    pod = tmp_path / "pod-cache"
    run = _prefill(pod, prefix, s3_server)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert line == (
        f"mcs-batch: error: {SAM_VIT_B_URL}: not in the mirror: no objects under {mirror_path(prefix, SAM_VIT_B_URL)}/ "
        "(write it with `mcs-batch weights mirror --to PREFIX` where the weights can be downloaded)"
    )
    assert not (pod / cache_key(SAM_VIT_B_URL)).exists()  # no half entry for the next pod to trust
    assert (pod / cache_key(BIOMEDCLIP_HF)).is_dir()  # the one before it was copied


def test_pinned_digests_are_verified_and_a_mismatch_leaves_nothing(mirrored, s3_server, tmp_path):
    prefix, _, _ = mirrored
    right = hashlib.sha256(SAM_BYTES).hexdigest()
    ok = _prefill(tmp_path / "a", prefix, s3_server, f"models.sam_sha256={right}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1].endswith(f"sha256:{right}  (pinned, verified)")
    wrong = "f" * 64
    bad = _prefill(tmp_path / "b", prefix, s3_server, f"models.sam_sha256={wrong}")
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"mcs-batch: error: {SAM_VIT_B_URL}: sha256 mismatch for {SAM_NAME}: expected {wrong}")
    assert not (tmp_path / "b" / cache_key(SAM_VIT_B_URL)).exists()


def test_prefill_and_mirror_of_an_s3_source_round_trip_the_bytes(s3_server, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    data = os.urandom(300_000)
    fs.pipe(f"{bucket}/published/weights.pth", data)
    uri = f"s3://{bucket}/published/weights.pth"
    record, _ = mirror(uri, to=f"s3://{bucket}/mirror", cache_dir=tmp_path / "net", storage_options=_s3(s3_server),
                       source_storage_options=_s3(s3_server))  # fmt: skip
    done = prefill(uri, mirror=f"s3://{bucket}/mirror/", cache_dir=tmp_path / "pod", storage_options=_s3(s3_server))
    assert done.copied == 2 and done.record.digest == record.digest == hashlib.sha256(data).hexdigest()
    assert sha256_file(done.record.local_path) == hashlib.sha256(data).hexdigest()
    again = prefill(uri, mirror=f"s3://{bucket}/mirror/", cache_dir=tmp_path / "pod", storage_options=_s3(s3_server))
    assert (again.copied, again.source) == (0, None)


def test_local_and_tiny_weights_have_nothing_to_mirror(tmp_path):
    local = tmp_path / "w.pth"
    local.write_bytes(b"x")
    done = prefill(str(local), mirror="s3://unused/", cache_dir=tmp_path / "cache")
    assert (done.copied, done.record.local_path) == (0, local)
    with pytest.raises(WeightsError, match="only downloaded weights are mirrored"):
        mirror(str(local), to="s3://unused/", cache_dir=tmp_path / "cache")


def test_prefill_loads_no_model_code(mirrored, s3_server, tmp_path):
    """The init step runs before every Ray pod: it copies files and imports neither torch nor Ray."""
    prefix, _, _ = mirrored
    code = (
        "import sys; from mcs_batch.cli import main; rc = main(sys.argv[1:]); "
        "print('imported:', sorted(m for m in ('torch', 'ray', 'open_clip') if m in sys.modules)); sys.exit(rc)"
    )
    env = os.environ | {"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
                        "PYTHONPATH": str(REPO)}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", code, "weights", "prefill", "--config", str(LUNG_CT), "--from", prefix,
         "--set", f"models.cache_dir={tmp_path / 'pod'}", "--endpoint-url", s3_server["endpoint_url"]],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "imported: []"
