"""Folders between WORK (local or object storage) and a node-local scratch folder, file by file."""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from mcs_batch.io.storage import StorageOptions, filesystem_for


def download_folder(uri: str, local: Path, storage: StorageOptions | None) -> int:
    """Copy every file under `uri` to `local` (same relative paths). Returns the number of files."""
    fs, root = filesystem_for(uri, storage)
    root = root.rstrip("/")
    n = 0
    for path in fs.find(root):
        dest = local / posixpath.relpath(path, root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(fs.cat_file(path))
        n += 1
    return n


def upload_folder(local: Path, uri: str, storage: StorageOptions | None) -> int:
    fs, root = filesystem_for(uri, storage)
    n = 0
    for folder, _, names in os.walk(local):
        for name in names:
            path = Path(folder) / name
            target = posixpath.join(root.rstrip("/"), path.relative_to(local).as_posix())
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.pipe_file(target, path.read_bytes())
            n += 1
    return n


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
