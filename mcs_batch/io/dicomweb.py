"""A DICOMweb server (a PACS, a vendor-neutral archive) as an fsspec filesystem, through dicomweb-client.

    dicomweb://HOST[:PORT]/PATH?QIDO-params    (dicomwebs:// for TLS)

The URI names the server's DICOMweb root and a QIDO-RS series query. Listing the root is that query
(the matching series, as folders); listing a series is a QIDO-RS instance search (its instances, as
files, keyed by SOP Instance UID: `version` is the UID, instances never change under one); reading an
instance is a WADO-RS retrieval of it as stored (`transfer-syntax=*`). So listing, header probes,
decoding and the SEG writer reach a PACS through the same route as a bucket (io/storage.filesystem_for
builds this filesystem for the two schemes). Headers come from WADO-RS series metadata, one request
per series, without pixels (`series_metadata`; archive/probe.py).

Paths inside the filesystem (no scheme):
    HOST:PORT/PATH?QUERY                                  the query (a folder of series)
    HOST:PORT/PATH/studies/S/series/R                     a series (a folder of instances)
    HOST:PORT/PATH/studies/S/series/R/instances/I         an instance (a file)

Politeness: one HTTP connection pool per process and credentials (`CONNECTIONS` connections at most,
callers beyond wait), retries with exponential back-off on 429/502/503/504 and failed connections,
honouring Retry-After (capped at MAX_RETRY_AFTER). Credentials travel in `DicomWebAuth` (built by the
CLI from the environment or a file), never in URIs, config, logs or the catalog.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from fsspec import AbstractFileSystem

from mcs_batch.errors import ConfigError

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
CONNECTIONS = 8  # concurrent requests per process and server at most (callers beyond wait)
RETRIES = 5  # attempts after the first, on 429/502/503/504
CONNECT_RETRIES = 2  # attempts after a refused or failed connection (a server that is down says so in ~2 s)
BACKOFF_SECONDS = 0.5  # first back-off; doubled each retry (when no Retry-After is given)
MAX_RETRY_AFTER = 60.0  # a server asking to wait longer is waited on this long
TIMEOUT = (10.0, 120.0)  # (connect, read) seconds of one request
RETRY_STATUSES = (429, 502, 503, 504)
QIDO_CONTROLS = {"limit", "offset", "fuzzymatching", "includefield"}
_UID = r"[0-9][0-9.]*"
_OBJECT = re.compile(rf"^(?P<base>.+?)/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID})"
                     rf"(?:/instances/(?P<instance>{_UID}))?)?$")  # fmt: skip


@dataclass(frozen=True)
class DicomWebAuth:
    """Credentials for a DICOMweb server: a bearer token, or basic credentials. Never printed."""

    token: str | None = None
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        kind = "bearer" if self.token else "basic" if self.username else "none"
        return f"DicomWebAuth({kind})"


def auth_from_file(path: str) -> DicomWebAuth:
    """Credentials from a JSON file: {"token": ...} or {"username": ..., "password": ...}. ConfigError
    (naming the file and the problem, never its content) when it cannot be read or holds neither."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the DICOMweb credentials file ({e.strerror or e})") from e
    except ValueError as e:
        raise ConfigError(f"{path}: the DICOMweb credentials file is not JSON") from e
    if not isinstance(data, dict) or not (data.get("token") or data.get("username")):
        raise ConfigError(f'{path}: expected {{"token": ...}} or {{"username": ..., "password": ...}}')
    return DicomWebAuth(token=data.get("token") or None, username=data.get("username") or None,
                        password=data.get("password") or None)  # fmt: skip


@dataclass(frozen=True)
class Location:
    """A parsed path of the filesystem: the server root (`base_url`, http or https), then the query of
    a root, or the study / series / instance UIDs of an object."""

    base_url: str
    authority: str  # HOST:PORT/PATH, the root's path without the query
    query: tuple[tuple[str, str], ...] = ()
    study: str | None = None
    series: str | None = None
    instance: str | None = None


def _check_query(uri: str, query: str) -> tuple[tuple[str, str], ...]:
    """QIDO-RS parameters: DICOM keywords or tags (8 hex digits, dotted sequence paths) with a value,
    or limit / offset / fuzzymatching / includefield. ConfigError naming the first bad one."""
    from pydicom.datadict import tag_for_keyword

    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as e:
        raise ConfigError(f"{uri}: malformed QIDO-RS query ({e})") from e
    for key, _ in pairs:
        names = key.split(".")
        if key in QIDO_CONTROLS or all(re.fullmatch(r"[0-9A-Fa-f]{8}", n) or tag_for_keyword(n) for n in names):
            continue
        raise ConfigError(f"{uri}: {key!r} is not a DICOM keyword or tag (QIDO-RS query parameters are "
                          "attributes such as StudyDate=20250101-20251231 or ModalitiesInStudy=CT)")  # fmt: skip
    return tuple(pairs)


def parse_uri(uri: str) -> Location:
    """A dicomweb:// or dicomwebs:// URI, checked. ConfigError (one line) when it is malformed: another
    scheme, no host, a bad port, a bad query; an object URI must name study, series and instance UIDs
    in order."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ConfigError(f"{uri}: not a DICOMweb URI (dicomweb://HOST[:PORT]/PATH?QIDO-params)")
    parts = urlsplit(f"{SCHEMES[scheme.lower()]}://{rest}")
    try:
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{uri}: bad port ({e})") from e
    if not parts.hostname or parts.username or parts.password or parts.fragment:
        raise ConfigError(f"{uri}: a DICOMweb URI names a host (and no credentials or fragment): "
                          "dicomweb://HOST[:PORT]/PATH?QIDO-params")  # fmt: skip
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host + (f":{port}" if port else "")
    path = parts.path.rstrip("/")
    match = _OBJECT.match(netloc + path)
    if match:
        if parts.query:
            raise ConfigError(f"{uri}: a query belongs on the server's root, not on a study or series")
        base = match["base"]
        study, series, instance = match["study"], match["series"], match["instance"]
    elif "/studies" in path.split("?")[0] and re.search(r"/(studies|series|instances)(/|$)", path):
        raise ConfigError(f"{uri}: expected .../studies/UID[/series/UID[/instances/UID]]")
    else:
        base, study, series, instance = netloc + path, None, None, None
    base_path = base[len(netloc):]
    return Location(base_url=f"{parts.scheme}://{netloc}{base_path}", authority=base,
                    query=_check_query(uri, parts.query), study=study, series=series,
                    instance=instance)  # fmt: skip


def _retry_policy():
    """urllib3's Retry (requests' own), with Retry-After capped at MAX_RETRY_AFTER."""
    from urllib3.util.retry import Retry

    class CappedRetry(Retry):
        def get_retry_after(self, response):
            seconds = super().get_retry_after(response)
            return None if seconds is None else min(seconds, MAX_RETRY_AFTER)

    return CappedRetry(total=RETRIES, connect=CONNECT_RETRIES, read=2, status=RETRIES, other=0,
                           status_forcelist=RETRY_STATUSES, allowed_methods=None, backoff_factor=BACKOFF_SECONDS,
                           respect_retry_after_header=True, raise_on_status=False)  # fmt: skip


@functools.lru_cache(maxsize=32)
def _session(auth: DicomWebAuth | None):
    """One requests session per process and credentials: its pool bounds concurrent requests."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    adapter = HTTPAdapter(max_retries=_retry_policy(), pool_connections=4, pool_maxsize=CONNECTIONS, pool_block=True)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if auth is not None and auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth is not None and auth.username:
        session.auth = (auth.username, auth.password or "")
    return session


@functools.lru_cache(maxsize=64)
def client_for(base_url: str, auth: DicomWebAuth | None = None):
    """A dicomweb-client for a server root, on the process's session for these credentials. The
    client's own retries are off: the session retries (honouring Retry-After)."""
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(url=base_url, session=_session(auth), timeout=TIMEOUT)
    client.set_http_retry_params(retry=False)
    return client


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a failed request (requests.HTTPError), else None."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def describe(error: BaseException) -> str:
    """One line for a failed request: the status and reason, or the exception's type and text."""
    status = http_status(error)
    if status is not None:
        return f"HTTP {status} {getattr(error.response, 'reason', '') or ''}".strip()
    return " ".join(f"{type(error).__name__}: {error}".split())[:200]


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


class SeriesMetadataUnsupported(Exception):
    """The server does not answer series-level metadata requests (WADO-RS .../metadata)."""


class DicomWebFileSystem(AbstractFileSystem):
    """fsspec over one DICOMweb protocol (http). Read-only: ls / find / info / open('rb')."""

    protocol = ("dicomweb",)
    http_scheme = "http"
    cachable = False  # credentials are arguments; fsspec's instance cache keys on their text

    def __init__(self, *, auth: DicomWebAuth | None = None, **kwargs):
        super().__init__(**kwargs)
        self.auth = auth

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        for scheme in SCHEMES:
            if path.lower().startswith(scheme + "://"):
                path = path[len(scheme) + 3 :]
                break
        head, sep, query = path.partition("?")
        return head.rstrip("/") + sep + query

    def unstrip_protocol(self, name: str) -> str:
        return f"{self.protocol[0]}://{self._strip_protocol(name)}"

    def location(self, path: str) -> Location:
        return parse_uri(self.unstrip_protocol(path))

    def client(self, loc: Location):
        return client_for(loc.base_url, self.auth)

    # -- listing ------------------------------------------------------------------------------------

    def _series_entries(self, path: str) -> list[dict]:
        loc = self.location(path)
        filters: dict = {}
        for key, value in loc.query:
            filters.setdefault(key, []).append(value) if key == "includefield" else filters.__setitem__(key, value)
        found = self.client(loc).search_for_series(search_filters=filters or None, get_remaining=True)
        entries = {}
        for item in found:
            study, series = _value(item, "0020000D"), _value(item, "0020000E")
            if study and series:
                name = f"{loc.authority}/studies/{study}/series/{series}"
                entries[name] = {"name": name, "type": "directory", "size": 0,
                                 "instances": int(_value(item, "00201209") or 0)}  # fmt: skip
        return [entries[k] for k in sorted(entries)]

    def _instance_entries(self, loc: Location) -> list[dict]:
        found = self.client(loc).search_for_instances(loc.study, loc.series, get_remaining=True)
        base = f"{loc.authority}/studies/{loc.study}/series/{loc.series}/instances/"
        entries = {}
        for item in found:
            uid = _value(item, "00080018")
            if uid:
                entries[base + uid] = {"name": base + uid, "type": "file", "size": 0, "version": uid}
        return [entries[k] for k in sorted(entries)]

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        loc = self.location(path)
        if loc.instance is not None:
            entries = [self.info(path)]
        elif loc.series is not None:
            entries = self._instance_entries(loc)
        elif loc.study is not None:
            entries = self._series_entries(f"{loc.authority}?StudyInstanceUID={loc.study}")
        else:
            entries = self._series_entries(path)
        return entries if detail else [e["name"] for e in entries]

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        path = self._strip_protocol(path)
        loc = self.location(path)
        if loc.series is not None and loc.instance is None:
            files = self._instance_entries(loc)
        elif loc.instance is not None:
            files = [self.info(path)]
        else:
            files = [f for series in self.ls(path, detail=False) for f in self.ls(series, detail=True)]
        out = {f["name"]: f for f in files}
        return out if detail else sorted(out)

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        loc = self.location(path)
        if loc.instance is not None:
            return {"name": path, "type": "file", "size": 0, "version": loc.instance}
        return {"name": path, "type": "directory", "size": 0}

    def isfile(self, path) -> bool:
        return self.location(self._strip_protocol(path)).instance is not None

    def isdir(self, path) -> bool:
        return not self.isfile(path)

    def exists(self, path, **kwargs) -> bool:
        return True  # a root is its query (ls says whether it matches anything); objects are listed

    # -- reading ------------------------------------------------------------------------------------

    def cat_file(self, path, start=None, end=None, **kwargs) -> bytes:
        """An instance as stored (WADO-RS, transfer-syntax=*), as a DICOM file's bytes.
        FileNotFoundError when the server does not have it (404)."""
        import pydicom

        loc = self.location(self._strip_protocol(path))
        if loc.instance is None:
            raise IsADirectoryError(path)
        try:
            ds = self.client(loc).retrieve_instance(loc.study, loc.series, loc.instance,
                                                    media_types=(("application/dicom", "*"),))  # fmt: skip
        except Exception as e:
            if http_status(e) == 404:
                raise FileNotFoundError(f"{self.unstrip_protocol(path)}: not on the server (HTTP 404)") from e
            raise
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
        data = buffer.getvalue()
        return data[start:end] if start is not None or end is not None else data

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise NotImplementedError(f"{self.protocol[0]}: read-only filesystem (mode {mode!r})")
        data = self.cat_file(path)
        f = io.BytesIO(data)
        f.size = len(data)  # type: ignore[attr-defined]
        return f

    def series_metadata(self, path: str) -> list[dict]:
        """DICOM JSON of every instance of a series (WADO-RS .../metadata: headers, no pixels).
        SeriesMetadataUnsupported when the server refuses that request (400, 404 of the resource
        itself, 405, 406, 501)."""
        loc = self.location(self._strip_protocol(path))
        try:
            return self.client(loc).retrieve_series_metadata(loc.study, loc.series)
        except Exception as e:
            if http_status(e) in (400, 405, 406, 501):
                raise SeriesMetadataUnsupported(describe(e)) from e
            raise


class DicomWebsFileSystem(DicomWebFileSystem):
    """The same over https (dicomwebs://)."""

    protocol = ("dicomwebs",)
    http_scheme = "https"


def filesystem(scheme: str, auth: DicomWebAuth | None = None) -> DicomWebFileSystem:
    """The filesystem for `scheme` ('dicomweb' or 'dicomwebs')."""
    cls = DicomWebsFileSystem if scheme.lower() == "dicomwebs" else DicomWebFileSystem
    return cls(auth=auth)


def check_root(uri: str, fs: DicomWebFileSystem) -> list[dict]:
    """The series a root URI's query matches, or ConfigError in one line: unreachable server,
    credentials refused (401/403), no DICOMweb service there, a query matching nothing."""
    loc = parse_uri(uri)
    if loc.instance is not None or loc.series is not None:
        return [fs.info(fs._strip_protocol(uri))]
    try:
        entries = fs.ls(fs._strip_protocol(uri), detail=True)
    except ConfigError:
        raise
    except Exception as e:
        status = http_status(e)
        if status in (401, 403):
            raise ConfigError(f"{uri}: the server refused access ({describe(e)}); give credentials in "
                              "DICOMWEB_TOKEN, or DICOMWEB_USER and DICOMWEB_PASSWORD, or a file named "
                              "by DICOMWEB_CREDENTIALS_FILE") from e  # fmt: skip
        if status is not None:
            raise ConfigError(f"{uri}: QIDO-RS series search failed ({describe(e)})") from e
        raise ConfigError(f"{uri}: cannot reach the DICOMweb server ({describe(e)})") from e
    if not entries:
        raise ConfigError(f"{uri}: the QIDO-RS query matches no series")
    return entries
