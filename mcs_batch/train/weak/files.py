"""Folders between WORK (local or object storage) and node-local folders, and single objects.

    report = download_folder("s3://b/weak/nnUNet_preprocessed/Dataset501_x", Path("/scratch/x"), storage,
                             connections=8, keep=lambda rel: not rel.startswith("gt_segmentations/"))

A folder is listed once (sizes included); its files are copied by `connections` threads at a time,
each one object per request (s3fs sends them all through its one event loop, so the requests are in
flight together; aiobotocore's connection pool holds 10); `keep(relative_path)` leaves files out. A
download is resumable: a file already there with the object's size is skipped; a file is written
beside the folder (`.<name>.partial/`) and renamed into place, so the folder never holds a partial
file (nnU-Net infers its dataset format from the file endings it finds). `locked(path)` serialises
the processes of one node on a lock file: the first downloads, the others find the files there.
Errors name the file: `TransferError("s3://b/.../x.b2nd: download failed (...)")`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from mcs_batch.io.storage import StorageOptions, filesystem_for

DEFAULT_CONNECTIONS = 8  # concurrent requests of one folder transfer (run.transfer_connections)


class TransferError(RuntimeError):
    """A file of a folder transfer failed; the message names it (the cause is chained)."""


@dataclass(frozen=True)
class TransferReport:
    """One folder transfer: files the folder holds (after the filter), those copied this time and their
    bytes, those already there with the right size (skipped), files the filter left out."""

    files: int
    transferred: int
    bytes: int
    skipped: int
    left_out: int
    seconds: float
    connections: int

    def to_dict(self) -> dict:
        return asdict(self)


def download_folder(uri: str, local: Path, storage: StorageOptions | None, *, connections: int = DEFAULT_CONNECTIONS,
                    keep: Callable[[str], bool] | None = None) -> TransferReport:  # fmt: skip
    """Copy the files under `uri` that `keep` accepts (relative '/'-paths; None: all) to `local`, same
    relative paths, `connections` at a time; files already in `local` with the object's size are skipped."""
    start = time.perf_counter()
    fs, root = filesystem_for(uri, storage)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    listing = fs.find(root, detail=True)
    wanted, left_out = [], 0
    for path, info in sorted(listing.items()):
        rel = posixpath.relpath(path, root)
        if keep is not None and not keep(rel):
            left_out += 1
            continue
        wanted.append((path, rel, int(info.get("size") or 0)))
    todo = [(path, rel, size) for path, rel, size in wanted if not _present(local / rel, size)]
    partial = local.parent / f".{local.name}.partial"

    def fetch(item: tuple[str, str, int]) -> int:
        path, rel, size = item
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = partial / f"{uuid.uuid4().hex}.part"
        try:
            fs.get_file(path, str(part))
            got = part.stat().st_size
            if got != size:
                raise OSError(f"{got} bytes written, the object holds {size}")
            os.replace(part, dest)
        except Exception as e:
            part.unlink(missing_ok=True)
            source = fs.unstrip_protocol(path)
            raise TransferError(f"{source}: download to {dest} failed ({type(e).__name__}: {e})") from e
        return size

    if todo:
        partial.mkdir(parents=True, exist_ok=True)
    moved = _run(fetch, todo, connections)
    if todo:
        _remove_empty(partial)
    return TransferReport(files=len(wanted), transferred=len(todo), bytes=moved, skipped=len(wanted) - len(todo),
                          left_out=left_out, seconds=round(time.perf_counter() - start, 3),
                          connections=min(connections, max(1, len(todo))))  # fmt: skip


def upload_folder(local: Path, uri: str, storage: StorageOptions | None, *,
                  connections: int = DEFAULT_CONNECTIONS) -> TransferReport:  # fmt: skip
    """Copy every file under `local` to `uri` (same relative paths), `connections` at a time."""
    start = time.perf_counter()
    fs, root = filesystem_for(uri, storage)
    root = root.rstrip("/")
    items = []
    for folder, _, names in os.walk(local):
        for name in sorted(names):
            path = Path(folder) / name
            items.append((path, posixpath.join(root, path.relative_to(local).as_posix())))
    for folder in sorted({posixpath.dirname(target) for _, target in items}):
        fs.makedirs(folder, exist_ok=True)  # a local WORK needs its folders; an object store ignores them

    def put(item: tuple[Path, str]) -> int:
        path, target = item
        try:
            fs.put_file(str(path), target)
        except Exception as e:
            where = fs.unstrip_protocol(target)
            raise TransferError(f"{path}: upload to {where} failed ({type(e).__name__}: {e})") from e
        return path.stat().st_size

    moved = _run(put, items, connections)
    fs.invalidate_cache(root)
    return TransferReport(files=len(items), transferred=len(items), bytes=moved, skipped=0, left_out=0,
                          seconds=round(time.perf_counter() - start, 3),
                          connections=min(connections, max(1, len(items))))  # fmt: skip


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock of the processes of this node on `lock_file` (flock; released on exit or when
    the holder dies)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(transfer: Callable, items: list, connections: int) -> int:
    """Sum of `transfer(item)` over items, at most `connections` at a time; the first error is raised
    (the transfers not yet started are cancelled)."""
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    if not items:
        return 0
    if connections == 1 or len(items) == 1:
        return sum(transfer(item) for item in items)
    with ThreadPoolExecutor(max_workers=min(connections, len(items)), thread_name_prefix="transfer") as pool:
        futures = [pool.submit(transfer, item) for item in items]
        total = 0
        try:
            for future in as_completed(futures):
                total += future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return total


def _present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # another process's partial files are in it, or it is gone
        folder.rmdir()


def write_bytes(uri: str, data: bytes, storage: StorageOptions | None) -> None:
    fs, path = filesystem_for(uri, storage)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def read_bytes(uri: str, storage: StorageOptions | None) -> bytes:
    fs, path = filesystem_for(uri, storage)
    return fs.cat_file(path)


def exists(uri: str, storage: StorageOptions | None) -> bool:
    fs, path = filesystem_for(uri, storage)
    return fs.exists(path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
