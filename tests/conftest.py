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
def s3_server():
    """A real S3 HTTP endpoint on 127.0.0.1 at a free port; yields the storage options for it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Test-only credentials for the loopback endpoint; moto accepts any.
    options = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
    }
    yield options
    server.stop()


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
