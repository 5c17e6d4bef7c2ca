"""A real Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`, installed by `make sysdeps`) for the
DICOMweb tests: its own storage folder, a free HTTP port on 127.0.0.1, no DICOM listener, the DicomWeb
plugin loaded, series metadata read in full from the stored files. Started as a process of ours and
stopped by its PID."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_missing() -> str | None:
    """Why an Orthanc cannot be started here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (make sysdeps: apt package orthanc)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"{DICOMWEB_PLUGIN} missing (make sysdeps: apt package orthanc-dicomweb)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc. `url`: its HTTP root; `dicomweb`: the DICOMweb root as an http URL;
    `users`: the basic-auth users it requires ({} for none)."""

    process: subprocess.Popen
    port: int
    folder: Path
    users: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def uri(self, query: str = "") -> str:
        """The job's input URI for this server: dicomweb://127.0.0.1:PORT/dicom-web[?query]."""
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web" + (f"?{query}" if query else "")

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        if data is not None:
            request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def upload(self, paths) -> list[str]:
        """POST each DICOM file to /instances (Orthanc's REST API); returns Orthanc's instance ids."""
        ids = []
        for p in paths:
            ids.append(json.loads(self._request("/instances", Path(p).read_bytes()))["ID"])
        return ids

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def start_orthanc(folder: Path, *, users: dict[str, str] | None = None, timeout: float = 60) -> Orthanc:
    """Start Orthanc with a generated configuration under `folder` and wait until /system answers."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    users = dict(users or {})
    config = {
        "Name": "mcs-batch-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": _free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users,
        "HttpServerEnabled": True,
        "HttpThreadsCount": 8,
        "SaveJobs": False,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "StudiesMetadata": "Full",  # metadata read from the stored files: every attribute
            "SeriesMetadata": "Full",
        },
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (the process owns it until stop)
    process = subprocess.Popen(["Orthanc", str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                               cwd=folder)  # fmt: skip
    server = Orthanc(process, port, folder, users)
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.get_json("/system")
            return server
        except (OSError, urllib.error.URLError):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc did not start on port {port}:\n{tail}") from None
            time.sleep(0.2)
