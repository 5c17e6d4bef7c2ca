"""A real S3 endpoint for the benches: moto's server on 127.0.0.1 at a free port, a process of its own
(stopped by the bench through the returned Popen)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def start_moto() -> tuple[subprocess.Popen, str]:
    """(the server process, its endpoint URL), once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start on port {port}") from None
            time.sleep(0.2)
