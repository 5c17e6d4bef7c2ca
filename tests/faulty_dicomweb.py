"""A fault-injecting HTTP proxy in front of the test Orthanc, on 127.0.0.1 (a thread of the test process:
only `requests` talks to it).

It forwards every request unchanged, except that the first `busy` requests whose path contains
`busy_path` are answered `status` (429 or 503) with `Retry-After: retry_after`, as an overloaded PACS
does, and every request for the object `fail_path` (not its metadata) is answered `fail_status`, as a
PACS whose storage lost a file does; `delay` seconds are added to every forwarded request (so that
concurrent ones overlap). It counts the requests, the busy and failed answers and the most requests it
held at once.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Faults:
    busy: int = 0
    busy_path: str = ""
    status: int = 429
    retry_after: str = "1"
    delay: float = 0.0
    fail_path: str = ""
    fail_status: int = 500
    failed: int = 0
    refuse_metadata: int = 0  # > 0: every .../metadata request is answered this status (no such service)
    requests: int = 0
    busy_answers: list[float] = field(default_factory=list)  # when each busy answer was given
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_proxy(upstream_port: int, faults: Faults) -> tuple[ThreadingHTTPServer, int]:
    """A proxy to 127.0.0.1:upstream_port; returns (server, its port). Stop with server.shutdown()."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else None
            with faults.lock:
                faults.requests += 1
                busy = faults.busy > 0 and faults.busy_path in self.path
                if busy:
                    faults.busy -= 1
                    faults.busy_answers.append(time.monotonic())
                faults.in_flight += 1
                faults.max_in_flight = max(faults.max_in_flight, faults.in_flight)
            try:
                lost = bool(faults.fail_path) and faults.fail_path in self.path and "/metadata" not in self.path
                if faults.refuse_metadata and self.path.split("?")[0].endswith("/metadata"):
                    self.send_response(faults.refuse_metadata)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if lost:
                    with faults.lock:
                        faults.failed += 1
                    self.send_response(faults.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if busy:
                    self.send_response(faults.status)
                    self.send_header("Retry-After", faults.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(faults.delay)
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()
            finally:
                with faults.lock:
                    faults.in_flight -= 1

        do_GET = do_POST = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]
