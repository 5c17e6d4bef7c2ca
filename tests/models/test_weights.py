"""Weights: URIs, once-per-node caching (also across processes, on a real S3 endpoint), pins, safe loading."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from mcs_batch.errors import ConfigError
from mcs_batch.models.weights import (
    WeightsError,
    WeightsRecord,
    cache_key,
    digest_files,
    fetch,
    load_state_dict,
    sha256_file,
    verify,
)

HUB_URI = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def _downloads(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "downloading into" in r.getMessage()]


# -- digests and pins -------------------------------------------------------------------------------


def test_sha256_file_streams_large_files(tmp_path):
    data = os.urandom(2_500_000)  # several 1 MiB chunks and a partial one
    (tmp_path / "w.bin").write_bytes(data)
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()


def test_weights_error_is_a_config_error():
    assert issubclass(WeightsError, ConfigError)


def test_local_file_is_used_in_place(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    for uri in (str(path), f"file://{path}"):
        record = fetch(uri, cache_dir=tmp_path / "cache")
        assert record.local_path == path and record.files == {"model.bin": digest}
        assert record.digest == digest and record.tiny is False and not record.is_folder
    assert not (tmp_path / "cache").exists()  # nothing copied
    assert record.to_dict() == {
        "uri": f"file://{path}",
        "local_path": str(path),
        "digest": digest,
        "files": {"model.bin": digest},
        "tiny": False,
    }


def test_local_folder_lists_every_file_but_hidden_ones(tiny_biomedclip_folder, tmp_path):
    folder = shutil.copytree(tiny_biomedclip_folder, tmp_path / "m")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("not weights")
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.txt").write_text("extra")
    record = fetch(str(folder), cache_dir=tmp_path / "cache")
    assert record.tiny is True and record.is_folder
    assert "sub/extra.txt" in record.files and not any(n.startswith(".") for n in record.files)
    assert record.files["open_clip_pytorch_model.bin"] == sha256_file(folder / "open_clip_pytorch_model.bin")
    listing = "".join(f"{n}\t{s}\n" for n, s in sorted(record.files.items()))
    assert record.digest == hashlib.sha256(listing.encode()).hexdigest()


def test_missing_local_path_names_the_uri(tmp_path):
    with pytest.raises(WeightsError, match=r"file:///nowhere/model\.bin: no such file or folder"):
        fetch("file:///nowhere/model.bin", cache_dir=tmp_path)


def test_pins_on_a_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    bad = "0" * 64
    assert fetch(str(path), cache_dir=tmp_path, expected=good.upper()).digest == good
    with pytest.raises(WeightsError) as err:
        fetch(str(path), cache_dir=tmp_path, expected=bad)
    assert str(err.value) == f"{path}: sha256 mismatch for model.bin: expected {bad}, actual {good}"
    verify(path, good)
    with pytest.raises(WeightsError, match=f"expected {bad}, actual {good}"):
        verify(path, bad)


def test_pins_on_a_folder(tiny_biomedclip_folder, tmp_path):
    record = fetch(str(tiny_biomedclip_folder), cache_dir=tmp_path)
    weights = "open_clip_pytorch_model.bin"
    verify(record, {weights: record.files[weights]})  # unnamed files are not checked
    verify(tiny_biomedclip_folder, dict(record.files))
    with pytest.raises(WeightsError, match=f"sha256 mismatch for {weights}: expected {'1' * 64}, actual"):
        verify(record, {weights: "1" * 64})
    with pytest.raises(WeightsError, match=r"pinned file 'gone\.bin' is missing"):
        verify(record, {"gone.bin": "1" * 64})
    with pytest.raises(WeightsError, match="a single sha256 pins a single file"):
        verify(record, record.files[weights])
    with pytest.raises(WeightsError, match="no such file or folder to verify"):
        verify(tmp_path / "absent", "1" * 64)


# -- safe loading ---------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would run code (creating a file): safe loading must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    import torch

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Payload(str(marker))}, path)
    with pytest.raises(WeightsError, match=r"evil\.pt: refused to load: the pickle holds objects other than"):
        load_state_dict(path)
    assert not marker.exists()


def test_state_dicts_load_from_torch_and_safetensors_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    torch.save(state, tmp_path / "w.bin")
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "checkpoint.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.bin", "checkpoint.pt", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == {"a.weight", "b"}
        assert torch.equal(loaded["a.weight"], state["a.weight"]) and loaded["b"].dtype == torch.int64


def test_not_a_state_dict_is_refused(tmp_path):
    import torch

    torch.save({"weight": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="entry 'lr' is a float, not a tensor"):
        load_state_dict(tmp_path / "mixed.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match=r"junk\.bin: not a readable torch weights file"):
        load_state_dict(tmp_path / "junk.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match="no such weights file"):
        load_state_dict(tmp_path / "absent.bin")


# -- tiny and hf-hub ----------------------------------------------------------------------------------------


def test_tiny_is_written_once_into_the_cache(tmp_path, caplog):
    import open_clip

    caplog.set_level(logging.INFO, logger="mcs_batch.models.weights")
    first = fetch("tiny", cache_dir=tmp_path)
    second = fetch("tiny", cache_dir=tmp_path)
    assert len(_downloads(caplog)) == 1
    assert first == second and first.tiny and first.local_path == tmp_path / cache_key("tiny")
    config = json.loads((first.local_path / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == str(first.local_path)  # its final place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    # plain open_clip loads the published folder too
    model = open_clip.create_model("local-dir:" + str(first.local_path))
    assert model.visual.head.proj.out_features == 32


def test_hf_hub_without_network_fails_with_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (the conftest sets it too) never touch the network here
    with pytest.raises(WeightsError) as err:
        fetch(HUB_URI, cache_dir=tmp_path)
    message = str(err.value)
    assert message.startswith(f"{HUB_URI}: could not download from the Hugging Face Hub")
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{cache_key(HUB_URI)}.lock"]
    with pytest.raises(WeightsError, match="expected hf-hub:org/name"):
        fetch("hf-hub:no-slash", cache_dir=tmp_path)


def test_cache_keys_are_readable_and_distinct():
    a, b = cache_key("s3://bucket/models/a/model.bin"), cache_key("s3://bucket/models/b/model.bin")
    assert a.startswith("s3-model.bin-") and b.startswith("s3-model.bin-") and a != b
    assert cache_key(HUB_URI).startswith("hf-hub-BiomedCLIP-PubMedBERT_256-vit_base_patch16_224-")


# -- S3 (moto server on loopback) ----------------------------------------------------------------------


def test_s3_object_is_downloaded_once(s3_server, s3_bucket, tmp_path, caplog):
    bucket, fs = s3_bucket
    data = os.urandom(300_000)
    fs.pipe(f"{bucket}/weights/model.bin", data)
    uri = f"s3://{bucket}/weights/model.bin"
    caplog.set_level(logging.INFO, logger="mcs_batch.models.weights")
    record = fetch(uri, cache_dir=tmp_path, storage_options=s3_server)
    again = fetch(uri, cache_dir=tmp_path, storage_options=s3_server)
    assert len(_downloads(caplog)) == 1 and again == record
    assert record.local_path == tmp_path / cache_key(uri) / "model.bin"
    assert record.local_path.read_bytes() == data
    assert record.files == {"model.bin": hashlib.sha256(data).hexdigest()}


def test_cached_s3_weights_need_no_store(s3_server, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    fs.pipe(f"{bucket}/m/model.bin", b"abc")
    uri = f"s3://{bucket}/m/model.bin"
    record = fetch(uri, cache_dir=tmp_path, storage_options=s3_server)
    unreachable = dict(s3_server, endpoint_url="http://127.0.0.1:9")  # nothing listens there
    assert fetch(uri, cache_dir=tmp_path, storage_options=unreachable) == record
    manifest = json.loads((tmp_path / cache_key(uri) / ".mcs_batch_download.json").read_text())
    assert manifest["uri"] == uri and manifest["file"] == "model.bin" and manifest["pid"] == os.getpid()


def test_s3_prefix_is_a_model_folder(s3_server, s3_bucket, tmp_path, tiny_biomedclip_folder, tiny_biomedclip):
    import torch

    from mcs_batch.models.biomedclip import load_biomedclip

    bucket, fs = s3_bucket
    for path in tiny_biomedclip_folder.iterdir():
        fs.put_file(str(path), f"{bucket}/models/tiny/{path.name}")
    record = fetch(f"s3://{bucket}/models/tiny/", cache_dir=tmp_path, storage_options=s3_server)
    assert record.is_folder and record.tiny
    assert record.files == digest_files(tiny_biomedclip_folder)
    clip = load_biomedclip(record)
    prompts = ["a lung"]
    assert torch.allclose(clip.encode_prompts(prompts), tiny_biomedclip.encode_prompts(prompts), atol=1e-6)


def test_missing_s3_object_names_the_uri(s3_server, s3_bucket, tmp_path):
    bucket, _ = s3_bucket
    with pytest.raises(WeightsError, match=rf"s3://{bucket}/nothing/here\.bin: no such object or prefix"):
        fetch(f"s3://{bucket}/nothing/here.bin", cache_dir=tmp_path, storage_options=s3_server)


def test_pinned_mismatch_evicts_the_cached_copy(s3_server, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    uri = f"s3://{bucket}/w.bin"
    fs.pipe(f"{bucket}/w.bin", b"old bytes")
    fetch(uri, cache_dir=tmp_path, storage_options=s3_server)
    fs.pipe(f"{bucket}/w.bin", b"new bytes")  # replaced at the same URI
    new = hashlib.sha256(b"new bytes").hexdigest()
    with pytest.raises(WeightsError, match="removed the cached copy"):
        fetch(uri, cache_dir=tmp_path, storage_options=s3_server, expected=new)
    assert not (tmp_path / cache_key(uri)).exists()
    assert fetch(uri, cache_dir=tmp_path, storage_options=s3_server, expected=new).digest == new


def _fetch_in_child(uri, cache_dir, options, barrier, out_path):
    """Spawned process: wait for the other one, fetch, report what happened (downloads, inode, digest)."""
    handler = logging.FileHandler(out_path.with_suffix(".log"))
    log = logging.getLogger("mcs_batch.models.weights")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    barrier.wait()
    start = time.time()
    record = fetch(uri, cache_dir=cache_dir, storage_options=options)
    result = {
        "start": start,
        "end": time.time(),
        "inode": os.stat(record.local_path).st_ino,
        "digest": record.digest,
    }
    handler.close()
    out_path.write_text(json.dumps(result))


def test_s3_weights_fetched_once_per_node_by_concurrent_processes(s3_server, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    data = os.urandom(48 * 2**20)  # large enough that the two fetches overlap in time
    fs.pipe(f"{bucket}/big/model.bin", data)
    uri = f"s3://{bucket}/big/model.bin"
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"child{i}.json" for i in range(2)]
    children = [ctx.Process(target=_fetch_in_child, args=(uri, cache, dict(s3_server), barrier, out)) for out in outs]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=180)
        assert child.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    logs = "".join(out.with_suffix(".log").read_text() for out in outs)
    assert logs.count("downloading into") == 1  # one download for the node
    assert results[0]["inode"] == results[1]["inode"]  # the same file
    assert results[0]["digest"] == results[1]["digest"] == hashlib.sha256(data).hexdigest()
    first, second = sorted(results, key=lambda r: r["start"])
    assert second["start"] < first["end"]  # they really asked at the same time
    assert sorted(p.name for p in cache.iterdir()) == [cache_key(uri), f"{cache_key(uri)}.lock"]


def test_weights_record_is_frozen():
    record = WeightsRecord(uri="x", local_path=Path("/x"), files={"x": "0" * 64})
    with pytest.raises(AttributeError):
        record.uri = "y"
