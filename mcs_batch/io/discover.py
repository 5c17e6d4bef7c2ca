"""Discovery: list the objects under input URIs and identify each one by its content.

Formats are recognised by their bytes (the DICM preamble or a parseable DICOM dataset, the NIfTI
header, PNG/JPEG magic), never by file extension. Only header bytes are read: on object storage a
ranged read of HEADER_BLOCK bytes (more only when a header is larger).
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import itertools
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import BinaryIO

import fsspec

from mcs_batch.errors import CaseError, ConfigError, ErrorCode
from mcs_batch.io.dicom_header import DicomHeader, read_dicom_header
from mcs_batch.io.images import image_record, sniff_image
from mcs_batch.io.nifti import nifti_record, sniff_nifti
from mcs_batch.io.storage import StorageOptions, filesystem_for, protocol_of, relative_key, to_uri
from mcs_batch.records import CaseKind, CaseRecord, Status, failed_record

HEADER_BLOCK = 16 * 1024  # bytes per ranged read while parsing headers (most headers fit in one)
GZIP_MAGIC = b"\x1f\x8b"
# Names that promise an image: when such a file cannot be identified it is a failure, not a skip.
IMAGE_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ObjectRef:
    """One object in storage. `rel` is its key: its path from the folder above the input it was found
    under (so it starts with the input's own name, see `input_key_root`)."""

    uri: str
    rel: str
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


def matches(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if include and not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in exclude)


def input_key_root(root_dir: str) -> str:
    """What keys (and so the ids of files that are not DICOM) are relative to: the folder above an
    input folder (above a file input's folder). Keys start with the input's own name, so two inputs
    laid out alike (siteA/img.png, siteB/img.png) give different case ids, and a folder moved to
    another bucket or prefix keeps its ids."""
    return posixpath.dirname(root_dir.rstrip("/"))


def check_inputs(located: Sequence[tuple[str, str, str, str]]) -> None:
    """ConfigError when inputs would give one object two keys or two objects one key. `located`:
    (uri, protocol, path, key root) of each input, the path without protocol (a folder or a file)."""
    for (ua, proto_a, a, root_a), (ub, proto_b, b, root_b) in itertools.combinations(located, 2):
        a, b = a.rstrip("/"), b.rstrip("/")
        if proto_a == proto_b and a == b:
            continue  # the same input twice: listed once
        if proto_a == proto_b and (a.startswith(b + "/") or b.startswith(a + "/")):
            inner, outer = (ua, ub) if a.startswith(b + "/") else (ub, ua)
            raise ConfigError(f"input {inner} lies inside input {outer}: its objects would be listed twice; "
                              "give only one of them")  # fmt: skip
        ka, kb = relative_key(a, root_a), relative_key(b, root_b)
        if ka == kb or ka.startswith(kb + "/") or kb.startswith(ka + "/"):
            raise ConfigError(f"inputs {ua} and {ub} are both named {min(ka, kb, key=len)!r}: their objects "
                              "would get the same keys and case ids; give their parent folders instead, or "
                              "segment them into separate outputs")  # fmt: skip


def unique_inputs(inputs: Sequence[str]) -> list[str]:
    """The inputs in order, each once (a trailing slash does not make another input)."""
    seen: dict[str, str] = {}
    for uri in inputs:
        seen.setdefault(uri.rstrip("/") or uri, uri)
    return list(seen.values())


def list_objects(
    inputs: Sequence[str],
    *,
    storage: StorageOptions | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    named: bool = True,
) -> list[ObjectRef]:
    """Every object under the input URIs (files or prefixes), sorted by URI. Keys start with the
    input's name (`input_key_root`); `named=False`: keys relative to the input itself (evaluation's
    ground-truth folders, whose layout is fixed). include/exclude match keys relative to the input.

    Raises ConfigError when an input does not exist or cannot be listed (unreachable bucket,
    missing credentials): that is a job-level problem, not a case-level one; or when inputs overlap
    (`check_inputs`).
    """
    refs: dict[str, ObjectRef] = {}
    located: list[tuple[str, str, str, str]] = []
    listed: list[tuple[str, fsspec.AbstractFileSystem, dict, str]] = []
    for uri in unique_inputs(inputs):
        fs, root = filesystem_for(uri, storage)
        try:
            if fs.isfile(root):
                info = fs.info(root)
                found = {root: info}
                root_dir = root.rsplit("/", 1)[0]
            else:
                found = fs.find(root, detail=True)
                root_dir = root
                if not found and not fs.exists(root):
                    raise ConfigError(f"{uri}: input does not exist")
        except ConfigError:
            raise
        except FileNotFoundError as e:
            raise ConfigError(f"{uri}: input does not exist") from e
        except Exception as e:  # botocore / aiohttp errors: unreachable endpoint, denied, ...
            raise ConfigError(f"{uri}: cannot list input ({type(e).__name__}: {e})") from e
        key_root = input_key_root(root_dir) if named else root_dir
        located.append((uri, protocol_of(uri), root, key_root))
        listed.append((root_dir, fs, found, key_root))
    check_inputs(located)
    for root_dir, fs, found, key_root in listed:
        for path, info in found.items():
            if info.get("type", "file") != "file" or not matches(relative_key(path, root_dir), include, exclude):
                continue
            full = to_uri(fs, path)
            refs[full] = ObjectRef(uri=full, rel=relative_key(path, key_root), size=int(info.get("size") or 0))
    return [refs[k] for k in sorted(refs)]


class _CountingReader(io.RawIOBase):
    """A read-only, seekable file wrapper that counts the bytes handed to the parsers and remembers a
    storage failure under them: an exception from the store (whatever its type: botocore, aiohttp and
    fsspec raise their own), or fewer bytes than the listing says the object holds. Parsers turn
    what they get into their own errors ("not DICOM", "truncated"); a failed read must not become one
    (probe_object: unreadable, retried by the next run)."""

    def __init__(self, f: BinaryIO, size: int):
        super().__init__()
        self._f = f
        self._size = size
        self.bytes = 0
        self.failure: str | None = None

    def readinto(self, buffer) -> int:
        position = self._f.tell()
        try:
            data = self._f.read(len(buffer))
        except Exception as e:
            self.failure = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the client wrote
            raise
        n = len(data)
        if n < len(buffer) and self._size and position + n < self._size:
            self.failure = f"storage returned {n} bytes at offset {position} of {self._size}"
        buffer[:n] = data
        self.bytes += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def _fetched_bytes(f, counted: int) -> int:
    cache = getattr(f, "cache", None)
    requested = getattr(cache, "total_requested_bytes", None)
    return int(requested) if requested else counted


@dataclass
class Probe:
    """What one object turned out to be: a DICOM header (to group into series) or a finished record."""

    ref: ObjectRef
    header: DicomHeader | None = None
    record: CaseRecord | None = None


def probe_object(ref: ObjectRef, *, fs: fsspec.AbstractFileSystem) -> Probe:
    """Identify one object by its content and read its header. Never raises for bad content; a read
    that storage failed (any exception from the store, a short read) is `unreadable`, a transient
    code: the next run reads the object again."""
    path = fs._strip_protocol(ref.uri)
    try:
        # the size is known from the listing: passing it saves a HEAD request per object on S3
        raw = fs.open(path, "rb", block_size=HEADER_BLOCK, cache_type="readahead", size=ref.size or None)
    except FileNotFoundError:
        return Probe(ref, record=_failure(ref, ErrorCode.UNREADABLE, f"{ref.uri}: object disappeared", 0))
    except Exception as e:  # denied, timed out, a bad status line: storage, not the file
        message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return Probe(ref, record=_failure(ref, ErrorCode.UNREADABLE, f"{ref.uri}: cannot open ({message})", 0))
    f = _CountingReader(raw, ref.size)
    probe = None
    try:
        with raw:
            head = f.read(352)  # enough for the DICM preamble, a NIfTI-1 header, image magic
            if not head and ref.size:  # the listing says there are bytes: storage failed, not the file
                f.failure = f"storage returned 0 of {ref.size} bytes"
            else:
                f.seek(0)
                probe = _identify(ref, f, head)
    except CaseError as e:
        probe = Probe(ref, record=_failure(ref, e.code, e.message, 0))
    except Exception:
        if f.failure is None:  # not the store's: a bug of ours or of a parser, recorded by probe_one
            raise
    if f.failure is not None:
        message = f"{ref.uri}: cannot read ({f.failure[:200]})"
        return Probe(ref, record=_failure(ref, ErrorCode.UNREADABLE, message, f.bytes))
    nbytes = _fetched_bytes(raw, f.bytes)
    if probe.header is not None:
        probe.header.bytes_read = nbytes
    elif probe.record is not None:
        probe.record.bytes_read = nbytes
    return probe


def _failure(
    ref: ObjectRef, code: ErrorCode, message: str, nbytes: int, kind: CaseKind = CaseKind.UNKNOWN
) -> CaseRecord:
    promised = ref.rel.lower().endswith(IMAGE_SUFFIXES)
    status = Status.FAILED if (promised or code != ErrorCode.NOT_DICOM) else Status.SKIPPED
    if ref.size == 0:
        code, message, status = ErrorCode.EMPTY_OBJECT, f"{ref.uri}: empty object (0 bytes)", Status.FAILED
    return failed_record(f"file:{ref.rel}", kind, ref.uri, ref.rel, code, message, status=status, bytes_read=nbytes)


def _recognised(ref: ObjectRef, kind: CaseKind, read) -> Probe:
    """The format is known from its magic bytes: a broken header fails as that kind."""
    try:
        return Probe(ref, record=read())
    except CaseError as e:
        return Probe(ref, record=_failure(ref, e.code, e.message, 0, kind))


def _identify(ref: ObjectRef, f: _CountingReader, head: bytes) -> Probe:
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.GzipFile(fileobj=f) as gz:
                inner = gz.read(348)
        except (OSError, EOFError) as e:
            return Probe(ref, record=_failure(ref, ErrorCode.TRUNCATED, f"{ref.uri}: corrupt gzip stream ({e})", 0))
        f.seek(0)
        if sniff_nifti(inner) is None:
            msg = f"{ref.uri}: gzip-compressed object that is not NIfTI"
            return Probe(ref, record=_failure(ref, ErrorCode.UNSUPPORTED_FORMAT, msg, 0))
        return _recognised(ref, CaseKind.NIFTI, lambda: nifti_record(f, uri=ref.uri, rel=ref.rel, gzipped=True))
    if sniff_nifti(head):
        return _recognised(ref, CaseKind.NIFTI, lambda: nifti_record(f, uri=ref.uri, rel=ref.rel, gzipped=False))
    if sniff_image(head):
        return _recognised(ref, CaseKind.IMAGE, lambda: image_record(f, uri=ref.uri, rel=ref.rel))
    header = read_dicom_header(f, uri=ref.uri, rel=ref.rel, size=ref.size)
    return Probe(ref, header=header)


def group_key(probe: Probe) -> str:
    """Objects with the same key are assembled together: DICOM by series, everything else alone."""
    if probe.header is not None and probe.header.series_uid:
        return "series:" + probe.header.series_uid
    return "object:" + probe.ref.rel
