"""Object storage access through fsspec: local paths, file://, s3:// and any other fsspec scheme.

The library never reads credentials from the environment itself: the CLI builds `StorageOptions`
(from flags / config), and where none are given s3fs falls back to the standard AWS chain
(environment, profile, instance role) on its own.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from mcs_batch.errors import CaseError, ConfigError, ErrorCode
from mcs_batch.io import dicomweb


@dataclass(frozen=True)
class StorageOptions:
    """Options for object stores. Secrets are never printed (see __repr__)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO / moto
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    profile: str | None = None
    anon: bool = False
    extra: dict = field(default_factory=dict)  # passed to fsspec as-is (non-S3 schemes)
    dicomweb: dicomweb.DicomWebAuth | None = None  # credentials of dicomweb(s):// servers

    def __repr__(self) -> str:
        return (
            f"StorageOptions(endpoint_url={self.endpoint_url!r}, key={'***' if self.key else None}, "
            f"secret={'***' if self.secret else None}, profile={self.profile!r}, anon={self.anon}, "
            f"dicomweb={self.dicomweb!r})"
        )

    def fsspec_kwargs(self, protocol: str) -> dict:
        """Keyword arguments for `fsspec.filesystem(protocol, ...)`."""
        if protocol in ("s3", "s3a"):
            # No listings cache: s3fs keeps every listing for the life of the (cached, shared) filesystem
            # instance, and a process lives on between jobs (Ray keeps idle workers, shard drivers share
            # them). With it, an object that arrived after the process last listed its folder was "not
            # found" when read (its parent's stale listing answers info()), and a new top-level prefix
            # was never listed: a grown series was missed (tests/archive/test_listing.py).
            kw: dict = {"anon": self.anon, "use_listings_cache": False}
            if self.key or self.secret:
                kw.update(key=self.key, secret=self.secret)
            if self.token:
                kw["token"] = self.token
            if self.profile:
                kw["profile"] = self.profile
            if self.endpoint_url:
                # Do not pass region_name with custom endpoints (moto/MinIO reject bucket creation).
                kw["client_kwargs"] = {"endpoint_url": self.endpoint_url}
            kw.update(self.extra)
            return kw
        return dict(self.extra)


def protocol_of(uri: str) -> str:
    """'s3' for s3://..., 'file' for plain paths and file://..."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def filesystem_for(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (no protocol)."""
    options = options or StorageOptions()
    protocol = protocol_of(uri)
    if protocol in dicomweb.SCHEMES:  # a PACS through DICOMweb (io/dicomweb.py); the URI checked here
        dicomweb.parse_uri(uri)
        fs = dicomweb.filesystem(protocol, options.dicomweb)
        return fs, fs._strip_protocol(uri)
    try:
        fs, path = url_to_fs(uri, **options.fsspec_kwargs(protocol))
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{uri}: no filesystem for scheme {protocol!r} ({e})") from e
    return fs, path


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for a path on `fs`: 'file:///abs/path' or 's3://bucket/key'."""
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    """Join URI / path parts with '/', keeping the scheme."""
    return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])


def relative_key(path: str, root: str) -> str:
    """`path` relative to `root` (both without protocol), '/'-separated."""
    root = root.rstrip("/")
    if path == root:
        return posixpath.basename(path)
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return path.lstrip("/")


def fetch_bytes(fs: fsspec.AbstractFileSystem | None, uri: str) -> bytes:
    """The whole object at `uri` (on `fs` when given). CaseError: `unreadable` when storage fails
    (any exception from the store: botocore, aiohttp and fsspec raise their own types) or returns
    fewer bytes than the object holds (a storage fault, not the file's), `empty_object` when the
    object holds 0 bytes."""
    try:
        if fs is None:
            with fsspec.open(uri, "rb") as f:
                data, size = f.read(), getattr(f, "size", None)
        else:
            with fs.open(fs._strip_protocol(uri), "rb") as f:
                data, size = f.read(), getattr(f, "size", None)
    except FileNotFoundError as e:
        raise CaseError(f"{uri}: object not found", code=ErrorCode.UNREADABLE) from e
    except Exception as e:  # nothing here parses: whatever failed is the store
        message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise CaseError(f"{uri}: cannot read object ({message})", code=ErrorCode.UNREADABLE) from e
    if isinstance(size, int) and len(data) < size:
        raise CaseError(f"{uri}: storage returned {len(data)} of {size} bytes", code=ErrorCode.UNREADABLE)
    if not data:
        raise CaseError(f"{uri}: empty object (0 bytes)", code=ErrorCode.EMPTY_OBJECT)
    return data


def arrow_filesystem(uri: str, storage: StorageOptions | None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem over the same fsspec filesystem (so S3 options apply identically)."""
    fs, path = filesystem_for(uri, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def native_arrow_filesystem(uri: str, storage: StorageOptions | None) -> tuple[pafs.FileSystem, str]:
    """pyarrow's own filesystem for `uri` (C++, not the Python-backed wrapper of `arrow_filesystem`) and
    the path in it: local disk, or S3 with the same endpoint and credentials (the standard AWS chain
    where StorageOptions has none). DuckDB reading an Arrow dataset through a Python-backed filesystem
    aborts or hangs at exit after a query that stops early (LIMIT); through these it does not."""
    protocol = protocol_of(uri)
    fs, path = filesystem_for(uri, storage)
    if protocol in ("file", "local"):
        return pafs.LocalFileSystem(), path
    if protocol not in ("s3", "s3a"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    s = storage or StorageOptions()
    kwargs: dict = {"anonymous": s.anon}
    if s.key or s.secret:
        kwargs.update(access_key=s.key, secret_key=s.secret, session_token=s.token)
    if s.endpoint_url:
        scheme, _, host = s.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme, region="us-east-1")
    return pafs.S3FileSystem(**kwargs), path


def ray_train_storage(uri: str, storage: StorageOptions | None) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: local paths as they are (absolute);
    object stores through a pyarrow wrapper of the same fsspec filesystem (so endpoint and credentials
    apply to checkpoints as to everything else)."""
    if protocol_of(uri) in ("file", "local"):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path)), None
    fs, path = filesystem_for(uri, storage)
    return path.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(fs))
