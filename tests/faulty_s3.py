"""A fault-injecting HTTP proxy in front of the test S3 endpoint (moto's server), on 127.0.0.1.

Clients (s3fs, pyarrow) talk to the proxy as to any S3 endpoint; it forwards every request to moto
unchanged, except those a rule picks, which it answers as a failing store or network does:

- `503`: an S3 `SlowDown` error (the client retries it with back-off),
- `drop`: the connection closed without an answer,
- `garbage`: a status line that is not HTTP ("bad status line").

Rules: a random share of the requests under some key prefixes (seeded, so a run is repeatable), and
keys whose every GET fails (a read that fails past the client's retries). Faults can be switched off
between runs (`heal`).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")  # fmt: skip


@dataclass
class Faults:
    """What the proxy breaks. `prefixes`: "bucket/key-prefix" strings the random faults apply to."""

    prefixes: tuple[str, ...] = ()
    rate_503: float = 0.0
    rate_drop: float = 0.0
    always_fail: set[str] = field(default_factory=set)  # "bucket/key" whose every GET fails
    mode: str = "garbage"  # how an always-failing GET fails: 503, drop or garbage
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # faults injected, by kind

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def pick(self, method: str, key: str) -> str | None:
        """The fault for this request, or None to forward it."""
        with self._lock:
            if method == "GET" and key in self.always_fail:
                fault = self.mode
            elif any(key.startswith(p) for p in self.prefixes) and method in ("GET", "HEAD"):
                draw = self._rng.random()
                fault = "503" if draw < self.rate_503 else "drop" if draw < self.rate_503 + self.rate_drop else None
            else:
                fault = None
            if fault:
                self.counts[fault] = self.counts.get(fault, 0) + 1
            return fault


class FaultyS3:
    """The proxy: `endpoint_url` for clients, `faults` to change what it breaks, `stop()` to end it."""

    def __init__(self, upstream: str, faults: Faults | None = None):
        self.upstream = urlsplit(upstream)
        self.faults = faults or Faults()
        proxy = self

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

            def _handle(self):
                body = self._body()
                key = unquote(urlsplit(self.path).path).lstrip("/")
                fault = proxy.faults.pick(self.command, key)
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if fault in ("drop", "garbage"):
                    if fault == "garbage":
                        self.wfile.write(b"HTTP/1.1 abc\r\n\r\n")
                        self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = proxy.upstream.netloc
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", response.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="faulty-s3", daemon=True)
        self.thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def heal(self) -> None:
        """Forward everything from now on."""
        self.faults = Faults()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
