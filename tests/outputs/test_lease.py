"""One writer per OUT: the lease on local disk and on the S3 endpoint (conditional PUT)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.lease import LeaseHeld, LeaseLost, WriterLease


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None
    bucket, _ = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", StorageOptions(**request.getfixturevalue("s3_server"))


def catalog(out) -> Catalog:
    uri, storage = out
    return Catalog(uri, storage=storage)


def test_a_second_writer_is_refused_naming_the_holder_until_release(out):
    first = WriterLease(catalog(out), "run-a", heartbeat_s=0.2)
    assert first.acquire() is None
    second = WriterLease(catalog(out), "run-b")
    with pytest.raises(LeaseHeld, match=r"being written by run run-a \(host .*, pid \d+"):
        second.acquire()
    first.check()
    first.release()
    assert second.acquire() is None  # a released lease is free, and nobody died
    second.check()
    with pytest.raises(LeaseLost):
        first.check()
    second.release()


def test_two_writers_starting_together_get_one_lease(out):
    barrier = threading.Barrier(4)
    won, refused = [], []

    def take(name: str) -> None:
        lease = WriterLease(catalog(out), name)
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            refused.append(name)

    threads = [threading.Thread(target=take, args=(f"run-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    won[0].release()


def test_a_dead_holder_frees_the_lease_at_once_and_is_named(out):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = datetime.now(UTC).isoformat()
    record = {"run_id": "run-dead", "host": socket.gethostname(), "pid": int(dead.stdout), "started_at": now,
              "heartbeat_at": now, "released": False}  # fmt: skip
    cat = catalog(out)
    cat.write_bytes(cat.path("locks", "writer-00000007.json"), json.dumps(record).encode())
    lease = WriterLease(cat, "run-next")
    assert lease.acquire()["run_id"] == "run-dead"
    assert lease.generation == 8
    lease.release()


def test_a_holder_that_stopped_beating_loses_the_lease_and_must_not_commit(out):
    paused = WriterLease(catalog(out), "run-paused", ttl_s=60, heartbeat_s=3600)  # never beats in this test
    paused.acquire()
    cat = catalog(out)
    stale = json.loads(cat.fs.cat_file(paused._path(paused.generation)))
    old = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    stale.update(host="another-node", heartbeat_at=old)  # as if its node stopped beating 2 minutes ago
    cat.write_bytes(paused._path(paused.generation), json.dumps(stale).encode())
    taker = WriterLease(catalog(out), "run-taker", ttl_s=60)
    assert taker.acquire()["run_id"] == "run-paused"
    with pytest.raises(LeaseLost):
        paused.check()
    paused_catalog = catalog(out)
    paused_catalog.lease = paused
    with pytest.raises(LeaseLost):
        paused_catalog.commit("run-paused", 0, [{"case_id": "a", "target": "t", "status": "ok"}], [])
    assert paused_catalog.committed() == {}
    paused.release()  # releasing a lost lease leaves the new holder's alone
    taker.check()
    taker.release()
