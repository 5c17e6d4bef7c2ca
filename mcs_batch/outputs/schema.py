"""Parquet schemas of everything mcs-batch writes, versioned. Bump the version on any change."""

from __future__ import annotations

import pyarrow as pa

MANIFEST_SCHEMA_VERSION = "1"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source_uris", pa.list_(pa.string())),
        pa.field("source_keys", pa.list_(pa.string())),
        pa.field("n_files", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("study_uid", pa.string()),
        pa.field("series_uid", pa.string()),
        pa.field("shape", pa.list_(pa.int32())),
        pa.field("spacing_mm", pa.list_(pa.float64())),
        pa.field("affine", pa.list_(pa.float64())),
        pa.field("slice_index", pa.list_(pa.int32())),
        pa.field("volume_index", pa.int32()),
        pa.field("transfer_syntax", pa.string()),
        pa.field("photometric", pa.string()),
        pa.field("warnings", pa.list_(pa.string())),
        pa.field("bytes_read", pa.int64()),
    ],
    metadata={"mcs_batch.table": "manifest", "mcs_batch.schema_version": MANIFEST_SCHEMA_VERSION},
)


def manifest_table(rows: list[dict]) -> pa.Table:
    """Rows (CaseRecord.to_row()) as a table with exactly the manifest schema."""
    columns = {name: [row.get(name) for row in rows] for name in MANIFEST_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)
