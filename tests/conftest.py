"""Fixtures that start real components: a local Ray and a real S3 HTTP endpoint (moto server mode)."""

from __future__ import annotations

import os
import re
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray: 2 CPUs, a small object store, no dashboard."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a fresh head of our own, never another run's cluster on this host
            num_cpus=2,
            object_store_memory=512 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP endpoint on 127.0.0.1 at a free port, in a process of its own (moto's server), ended
    by its pid; yields the storage options for it. Its own process: delta-rs holds the GIL while it waits
    for the store, so a server in a thread of the test process would never answer it."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start on port {port}") from None
            time.sleep(0.2)
    # Test-only credentials for the loopback endpoint; moto accepts any.
    options = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
    }
    yield options
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the loopback endpoint: yields (bucket_name, s3fs filesystem)."""
    import s3fs

    name = "t-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-") + f"-{_free_port()}"
    fs = s3fs.S3FileSystem(
        key=s3_server["key"],
        secret=s3_server["secret"],
        client_kwargs={"endpoint_url": s3_server["endpoint_url"]},
        skip_instance_cache=True,
    )
    fs.mkdir(name)
    yield name, fs
    fs.rm(name, recursive=True)


@pytest.fixture
def orthanc(tmp_path_factory):
    """A real, empty Orthanc with its DICOMweb plugin on 127.0.0.1 (tests/orthanc.py), no auth;
    stopped by its PID."""
    from tests.orthanc import orthanc_missing, start_orthanc

    if (reason := orthanc_missing()) is not None:
        pytest.fail(reason)  # make sysdeps installs it: a missing server is a broken set-up, not a skip
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def orthanc_basic_auth(tmp_path_factory):
    """The same Orthanc requiring basic credentials (test-only user on the loopback server)."""
    from tests.orthanc import orthanc_missing, start_orthanc

    if (reason := orthanc_missing()) is not None:
        pytest.fail(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-auth"), users={"tester": "test-only-password"})
    yield server
    server.stop()
