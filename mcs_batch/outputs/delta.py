"""OUT's tables as Delta Lake tables (delta-rs): where they live, how they are opened, and commits that
retry on conflict.

    OUT/catalog/cases/        one row per (case, target)            CASES_SCHEMA
    OUT/catalog/slices/       one row per (case, target, slice)     SLICES_SCHEMA
    OUT/catalog/evaluation/   one row per (dataset, target, truth)  EVALUATION_SCHEMA
    INDEX (default OUT/index) one row per archive object            INDEX_SCHEMA, partitioned by prefix_id

Each folder holds its Parquet data files and `_delta_log/`, the table's transaction log: a file is part
of the table only once a commit names it, so readers (deltalake, Polars, DuckDB, Spark, Trino) never
see a half-written commit, and a crash leaves at worst data files no commit names (vacuum removes
them). Concurrent writers (several jobs, a refinement) commit with optimistic concurrency: a commit
whose reads a concurrent commit invalidated is retried on the new snapshot (`with_retries`).

On object stores the log's commit files are created with a conditional write (`If-None-Match: *`,
delta-rs' `conditional_put`): S3 (since 2024), MinIO, Cloudflare R2 and the other stores that support
it need nothing more; a store without conditional writes cannot take concurrent writers.

The schema version of a table is stamped in the metadata of its first column
(`mcs_batch.schema_version`): a release refuses to write a table a newer release wrote, and any table
whose Delta protocol it cannot write, before writing anything (ConfigError: one line, exit 2).
"""

from __future__ import annotations

import json
import posixpath
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import pyarrow as pa

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, join, protocol_of

DELTA_LOG = "_delta_log"
DELTA_FILE = re.compile(r"^part-\d{5}-[0-9a-f-]{36}-c\d{3}(\.\w+)*\.parquet$")  # how delta-rs names data files
SCHEMA_VERSION_KEY = "mcs_batch.schema_version"
COMMIT_ATTEMPTS = 12  # a commit that keeps conflicting with concurrent ones is tried this many times
# Delta protocol this release writes (delta-rs 1.6): writer versions up to 7, with these table features.
MAX_WRITER_VERSION = 7
WRITER_FEATURES = frozenset({"appendOnly", "invariants", "checkConstraints", "changeDataFeed", "generatedColumns",
                             "timestampNtz", "deletionVectors", "v2Checkpoint", "domainMetadata", "columnMapping",
                             "identityColumns", "inCommitTimestamp"})  # fmt: skip

# Every table: a checkpoint every 50 commits; time travel a week back (log entries, and the files of
# the versions they describe, are kept that long: vacuum removes files a week after they left the table).
# A removed file's tombstone is kept in checkpoints twice as long: a checkpoint forgets expired
# tombstones, and a file whose tombstone is forgotten before a vacuum saw it expired is never removed
# (delta-rs' "full" vacuum, which would find it, also removes files concurrent writers have not yet
# committed); with two weeks, any vacuum in the second week removes it. The job vacuums at every end.
TABLE_PROPERTIES = {"delta.checkpointInterval": "50", "delta.logRetentionDuration": "interval 7 days",
                    "delta.deletedFileRetentionDuration": "interval 14 days"}  # fmt: skip
_INTERVAL = re.compile(r"^\s*interval\s+(\d+)\s+(second|minute|hour|day|week)s?\s*$", re.IGNORECASE)
_UNIT_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}


def time_travel_seconds(dt) -> float:
    """How far back a table's versions stay readable: its delta.logRetentionDuration (30 days when
    unset or unreadable, Delta's default)."""
    found = _INTERVAL.match(str(dt.metadata().configuration.get("delta.logRetentionDuration", "")))
    return int(found.group(1)) * _UNIT_S[found.group(2).lower()] if found else 30 * 86400.0

T = TypeVar("T")


@dataclass(frozen=True)
class TableSpec:
    """One Delta table of OUT: its name (for messages and `query`), folder and schema."""

    name: str
    folder: str  # relative to its root (OUT, or the index root)
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()

    @property
    def version(self) -> str:
        return self.schema.metadata[b"mcs_batch.schema_version"].decode()

    def arrow_schema(self) -> pa.Schema:
        """The schema as written: the first field carries the schema version (Delta keeps field
        metadata, not schema metadata)."""
        first = self.schema.field(0).with_metadata({SCHEMA_VERSION_KEY: self.version})
        return pa.schema([first, *[self.schema.field(i) for i in range(1, len(self.schema))]])


class CommitConflict(RuntimeError):
    """A commit kept conflicting with concurrent commits past its attempts: nothing of it was committed."""


def delta_options(uri: str, storage: StorageOptions | None) -> dict[str, str]:
    """delta-rs storage options for `uri`: the same endpoint and credentials as the rest of the job
    (StorageOptions; without them, the standard AWS chain of the environment), and conditional writes
    for the log on object stores."""
    protocol = protocol_of(uri)
    if protocol in ("file", "local"):
        return {}
    if protocol not in ("s3", "s3a"):
        raise ConfigError(f"{uri}: the catalog's Delta tables are written to local disk or S3-compatible stores")
    options = {"conditional_put": "etag"}
    s = storage or StorageOptions()
    if s.endpoint_url:
        options["AWS_ENDPOINT_URL"] = s.endpoint_url
        options.setdefault("AWS_REGION", "us-east-1")  # any region: a custom endpoint ignores it
        if s.endpoint_url.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if s.key:
        options["AWS_ACCESS_KEY_ID"] = s.key
    if s.secret:
        options["AWS_SECRET_ACCESS_KEY"] = s.secret
    if s.token:
        options["AWS_SESSION_TOKEN"] = s.token
    if s.profile:
        options["AWS_PROFILE"] = s.profile
    if s.anon:
        options["AWS_SKIP_SIGNATURE"] = "true"
    return options


def table_uri(root: str, spec: TableSpec) -> str:
    """The table's URI as delta-rs wants it: an absolute local path, or the object store URI."""
    uri = join(root, spec.folder) if spec.folder else root.rstrip("/")
    if protocol_of(uri) in ("file", "local"):
        return filesystem_for(uri)[1]
    return uri


def schema_version(dt) -> int:
    fields = json.loads(dt.schema().to_json())["fields"]
    return int((fields[0].get("metadata") or {}).get(SCHEMA_VERSION_KEY, 0) or 0)


def open_table(root: str, spec: TableSpec, storage: StorageOptions | None, *, version: int | str | None = None):
    """The table (a deltalake.DeltaTable) at `version` (a number, or an ISO time: as it stood then),
    or None when it was never written. ConfigError when its log cannot be read or it holds Parquet
    files of the layout before Delta tables (`mcs-batch catalog migrate`)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    uri = table_uri(root, spec)
    options = delta_options(uri, storage)
    try:
        if not DeltaTable.is_deltatable(uri, storage_options=options):
            if _plain_parquet(root, spec, storage):
                raise ConfigError(f"{table_uri(root, spec)}: the {spec.name} table is in the layout before Delta "
                                  f"tables; convert it with `mcs-batch catalog migrate {root}`")  # fmt: skip
            return None
        if isinstance(version, int):
            return DeltaTable(uri, storage_options=options, version=version)
        dt = DeltaTable(uri, storage_options=options)
        if version is not None:
            moment = _moment(version)
            dt.load_as_version(moment)
            if dt.history(1)[0]["timestamp"] > moment.timestamp() * 1000:  # delta-rs falls back to version 0
                raise ConfigError(f"{table_uri(root, spec)}: {spec.name} table: no version as of {version} "
                                  "(it was created later)")  # fmt: skip
        return dt
    except TableNotFoundError:
        return None
    except ConfigError:
        raise
    except (DeltaError, OSError, ValueError) as e:
        what = "no version as of" if version is not None and "version" in str(e).lower() else "cannot read its log"
        raise ConfigError(f"{table_uri(root, spec)}: {spec.name} table: {what} "
                          f"{version if what.startswith('no') else ''}({_first_line(e)})".replace("  ", " ")) from e


def _moment(text: str) -> datetime:
    """An ISO time as a timezone-aware datetime (UTC when it names no zone)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ConfigError(f"as of {text!r}: not a table version, an ISO time or a run id") from e
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _plain_parquet(root: str, spec: TableSpec, storage: StorageOptions | None) -> bool:
    """Parquet files of the layout before Delta tables in the table's folder (a data file delta-rs is
    writing for a table's first commit, not in the log yet, is not one of them)."""
    fs, path = filesystem_for(join(root, spec.folder) if spec.folder else root, storage)
    try:
        names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return False
    return any(n.endswith(".parquet") and not DELTA_FILE.match(n) and not n.startswith(".") for n in names)


def check_writable(dt, spec: TableSpec, where: str) -> None:
    """ConfigError (nothing written) when this release cannot write the table: a newer schema, or a
    Delta protocol or table feature delta-rs does not write."""
    found = schema_version(dt)
    if found > int(spec.version):
        raise ConfigError(f"{where}: the {spec.name} table has schema version {found}, newer than this release's "
                          f"{spec.version}: write it with a newer mcs-batch")  # fmt: skip
    protocol = dt.protocol()
    unknown = sorted(set(protocol.writer_features or ()) - WRITER_FEATURES)
    if protocol.min_writer_version > MAX_WRITER_VERSION or unknown:
        needs = f"writer version {protocol.min_writer_version}" + (f" with features {unknown}" if unknown else "")
        raise ConfigError(f"{where}: the {spec.name} table needs Delta {needs}, which this release cannot write "
                          "(read it with any Delta reader; write it with a newer mcs-batch)")  # fmt: skip


def with_retries(commit: Callable[[], T], *, what: str, attempts: int = COMMIT_ATTEMPTS) -> T:
    """`commit()` again, on a fresh snapshot, while it fails on a concurrent commit (jittered back-off);
    CommitConflict once `attempts` are spent. Other errors pass through."""
    from deltalake.exceptions import CommitFailedError

    for attempt in range(1, attempts + 1):
        try:
            return commit()
        except CommitFailedError as e:
            if attempt == attempts:
                raise CommitConflict(f"{what}: {attempts} attempts conflicted with concurrent commits; nothing of "
                                     f"it was committed ({_first_line(e)})") from e  # fmt: skip
            time.sleep(min(5.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:240]
