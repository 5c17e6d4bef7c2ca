"""The archive index: what a job learnt about each object, so that the next run does not read it again.

    INDEX/objects/<prefix_id>/part-<run_id>-<seq>.parquet   one row per object probed in that run

INDEX is `inputs.index`, by default OUT/index. A row holds the object's URI, key, size, version (ETag or
mtime), its probe result (the parsed DICOM header, or the finished record of a non-DICOM object, as
JSON) and the case it was assigned to. The listing of a prefix reads that prefix's parts (newest row
per URI wins) and reuses the probe result of every object whose size and version are unchanged, so a
nightly run reads headers only of new or changed objects. Parts are written atomically, so a crashed
run leaves at worst fewer rows (their objects are read again next time).
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from mcs_batch.io.storage import StorageOptions, filesystem_for

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = "1"
INDEX_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("rel", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("version", pa.string()),
        pa.field("payload", pa.string()),
        pa.field("case_id", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    metadata={"mcs_batch.table": "archive_index", "mcs_batch.schema_version": INDEX_SCHEMA_VERSION},
)


class ArchiveIndex:
    """Reads and appends the index parts under one index root (local folder or object-store prefix)."""

    def __init__(self, root: str, *, storage: StorageOptions | None = None):
        self.root = root
        self.fs, self.path = filesystem_for(root, storage)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = "file" in protocols

    def _folder(self, prefix_id: str) -> str:
        return posixpath.join(self.path, "objects", prefix_id)

    def read_prefix(self, prefix_id: str) -> dict[str, dict]:
        """uri -> newest row of the objects of one prefix ({} when the prefix was never indexed)."""
        try:
            parts = sorted(p for p in self.fs.ls(self._folder(prefix_id), detail=False) if p.endswith(".parquet"))
        except FileNotFoundError:
            return {}
        rows: dict[str, dict] = {}
        for part in parts:  # part names sort by run id (a UTC timestamp), then sequence: newest last
            if posixpath.basename(part).startswith(".tmp-"):
                continue
            try:
                with self.fs.open(part, "rb") as f:
                    table = pq.read_table(f, schema=INDEX_SCHEMA)
            except Exception as e:  # a part that cannot be read: its objects' headers are read again
                log.warning("archive index part %s unreadable (%s: %s): its objects are probed again",
                            part, type(e).__name__, e)  # fmt: skip
                continue
            for row in table.to_pylist():
                rows[row["uri"]] = row
        return rows

    def append(self, prefix_id: str, rows: list[dict], *, run_id: str, seq: int) -> None:
        """One new part for a prefix (atomic: temporary name + rename locally, one PUT on object stores)."""
        if not rows:
            return
        table = pa.Table.from_pylist([{**r, "run_id": run_id} for r in rows], schema=INDEX_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        folder = self._folder(prefix_id)
        path = posixpath.join(folder, f"part-{run_id}-{seq:06d}.parquet")
        data = sink.getvalue().to_pybytes()
        if self.local:
            os.makedirs(folder, exist_ok=True)
            tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)
