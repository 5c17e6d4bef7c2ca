"""The archive index: what a job learnt about each object, so that the next run does not read it again.

    INDEX/            a Delta table (outputs/delta.py), partitioned by prefix_id: one row per object

INDEX is `inputs.index`, by default OUT/index. A row holds the object's listing prefix, URI, key, size,
version (ETag or mtime), its probe result (the parsed DICOM header, or the finished record of a
non-DICOM object, as JSON) and the case it was assigned to. The listing of a prefix reads that
prefix's partition and reuses the probe result of every object whose size and version are unchanged,
so a nightly run reads headers only of new or changed objects. What a run learns is merged in by URI
(a changed object's row replaced, never a second row), so a prefix's partition holds one row per
object however many nights read it; a crashed run leaves at worst fewer rows (their objects are read
again next time). Concurrent jobs merge with optimistic concurrency, like the catalog.
"""

from __future__ import annotations

import pyarrow as pa

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.delta import TABLE_PROPERTIES, TableSpec, delta_options, open_table, table_uri, with_retries

INDEX_SCHEMA_VERSION = "2"  # 2: a Delta table partitioned by prefix_id (1: Parquet parts per prefix)
INDEX_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("rel", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("version", pa.string()),
        pa.field("payload", pa.string()),
        pa.field("case_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("prefix_id", pa.string(), nullable=False),
    ],
    metadata={"mcs_batch.table": "archive_index", "mcs_batch.schema_version": INDEX_SCHEMA_VERSION},
)
INDEX = TableSpec("index", "", INDEX_SCHEMA, partition_by=("prefix_id",))


class ArchiveIndex:
    """Reads a prefix's rows of, and merges a run's rows into, the index under one root (a local
    folder or an object-store prefix)."""

    def __init__(self, root: str, *, storage: StorageOptions | None = None):
        self.root = root
        self.storage = storage

    def table(self):
        return open_table(self.root, INDEX, self.storage)

    def read_prefix(self, prefix_id: str) -> dict[str, dict]:
        """uri -> row of the objects of one prefix ({} when the prefix was never indexed)."""
        dt = self.table()
        if dt is None:
            return {}
        table = dt.to_pyarrow_dataset(file_pruning_predicate=[("prefix_id", "=", prefix_id)]).to_table()
        return {row["uri"]: row for row in table.to_pylist()}

    def append(self, prefix_id: str, rows: list[dict], *, run_id: str, seq: int = 0) -> None:
        """Merge what a run learnt about objects of one prefix: one row per URI (the newest)."""
        if not rows:
            return
        from deltalake import CommitProperties, write_deltalake

        table = pa.Table.from_pylist([{**r, "run_id": run_id, "prefix_id": prefix_id} for r in rows],
                                     schema=INDEX.arrow_schema())  # fmt: skip
        table = table.take(_last_per_uri(table))
        metadata = CommitProperties(custom_metadata={"mcs_batch.run_id": run_id, "mcs_batch.seq": str(seq)})
        options = delta_options(self.root, self.storage)

        def merge() -> None:
            dt = self.table()
            if dt is None:
                try:
                    write_deltalake(table_uri(self.root, INDEX), table, mode="error", partition_by=["prefix_id"],
                                    name="index", storage_options=options, commit_properties=metadata,
                                    configuration=TABLE_PROPERTIES)  # fmt: skip
                    return
                except Exception:
                    if self.table() is None:
                        raise
                    dt = self.table()  # another job created it first: merge into it
            merger = dt.merge(table, "t.prefix_id = s.prefix_id AND t.uri = s.uri", source_alias="s",
                              target_alias="t", streamed_exec=False, commit_properties=metadata)  # fmt: skip
            merger.when_matched_update_all().when_not_matched_insert_all().execute()

        with_retries(merge, what=f"the archive index of prefix {prefix_id}")


def _last_per_uri(table: pa.Table) -> list[int]:
    """Row positions keeping the last row of each URI (a merge source must not match a row twice)."""
    last: dict[str, int] = {}
    for i, uri in enumerate(table.column("uri").to_pylist()):
        last[uri] = i
    return sorted(last.values())
