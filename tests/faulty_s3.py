"""A fault-injecting HTTP proxy in front of the test S3 endpoint (moto's server), on 127.0.0.1.

Clients (s3fs, pyarrow, delta-rs) talk to the proxy as to any S3 endpoint; it forwards every request to
moto unchanged, except those a rule picks, which it answers as a failing store or network does:

- `503`: an S3 `SlowDown` error (the client retries it with back-off),
- `drop`: the connection closed without an answer,
- `garbage`: a status line that is not HTTP ("bad status line").

Rules: a random share of the requests under some key prefixes (seeded, so a run is repeatable), keys
whose every GET fails (a read that fails past the client's retries), and PUTs under a prefix that fail
after a number of them went through (a commit whose log entry never lands).

The proxy runs in a process of its own (delta-rs holds the GIL while it waits for the store, so a
server thread in the test process would never answer it); the test changes its rules and reads what it
injected through a control path (`/__faults__`: no S3 bucket name holds underscores). `heal` switches
the faults off between runs.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

CONTROL = "/__faults__"
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")  # fmt: skip


@dataclass
class Faults:
    """What the proxy breaks. `prefixes`: "bucket/key-prefix" strings the random faults apply to."""

    prefixes: tuple[str, ...] = ()
    rate_503: float = 0.0
    rate_drop: float = 0.0
    always_fail: tuple[str, ...] = ()  # "bucket/key" whose every GET fails
    mode: str = "garbage"  # how an always-failing GET fails: 503, drop or garbage
    fail_puts_under: tuple[str, ...] = ()  # "bucket/key-prefix": PUTs there fail (dropped) ...
    puts_allowed: int = 0  # ... after this many of them went through
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # faults injected, by kind

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def pick(self, method: str, key: str) -> str | None:
        """The fault for this request, or None to forward it."""
        with self._lock:
            if method == "PUT" and any(key.startswith(p) for p in self.fail_puts_under):
                self.puts_allowed -= 1
                fault = "drop" if self.puts_allowed < 0 else None
            elif method == "GET" and key in self.always_fail:
                fault = self.mode
            elif any(key.startswith(p) for p in self.prefixes) and method in ("GET", "HEAD"):
                draw = self._rng.random()
                fault = "503" if draw < self.rate_503 else "drop" if draw < self.rate_503 + self.rate_drop else None
            else:
                fault = None
            if fault:
                self.counts[fault] = self.counts.get(fault, 0) + 1
            return fault

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "counts"}).encode()


def serve(upstream: str, port: int) -> None:
    """The proxy's process: forward to `upstream` on 127.0.0.1:`port` until killed."""
    target = urlsplit(upstream)
    state = {"faults": Faults()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, then the blank line
                            trailer = self.rfile.readline()
                            raw += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return raw
                    raw += self.rfile.read(size + 2)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, data: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self):
            body = self._body()
            if self.path.startswith(CONTROL):
                if self.command == "PUT":
                    state["faults"] = Faults(**{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in json.loads(body).items()})  # fmt: skip
                self._reply(200, json.dumps(state["faults"].counts).encode())
                return
            key = unquote(urlsplit(self.path).path).lstrip("/")
            fault = state["faults"].pick(self.command, key)
            if fault == "503":
                self._reply(503, SLOW_DOWN, "application/xml")
                return
            if fault in ("drop", "garbage"):
                if fault == "garbage":
                    self.wfile.write(b"HTTP/1.1 abc\r\n\r\n")
                    self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
            finally:
                conn.close()
            self.send_response(response.status, response.reason)
            for k, v in response.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", response.getheader("Content-Length") or "0"
                             if self.command == "HEAD" else str(len(data)))  # fmt: skip
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


class FaultyS3:
    """The proxy, seen from a test: `endpoint_url` for clients, `counts()` of what it broke, `heal()`,
    `stop()` (by its pid)."""

    def __init__(self, upstream: str, faults: Faults | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-c", f"from tests.faulty_s3 import serve; "
                                         f"serve({upstream!r}, {self.port})"])  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                self._control("GET")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the faulty S3 proxy did not start") from None
                time.sleep(0.1)
        self.configure(faults or Faults())

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _control(self, method: str, data: bytes | None = None) -> dict:
        request = urllib.request.Request(self.endpoint_url + CONTROL, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def configure(self, faults: Faults) -> None:
        self._control("PUT", faults.to_json())

    def counts(self) -> dict[str, int]:
        return self._control("GET")

    def heal(self) -> None:
        """Forward everything from now on."""
        self.configure(Faults())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
