"""Listing an archive in parallel: top-level prefixes on the driver, each prefix listed in a Ray task.

The driver only lists each input's top level (`fs.ls`): a few entries. Every sub-prefix is listed
recursively by its own task, which sorts its objects by key, attaches what the archive index knows of
each (header, case) when the object's size and version are unchanged, splits them into waves of
`wave_objects` to twice as many objects (between folders where it can) and writes each wave as a
Parquet file under the run's staging folder. A prefix that storage will not list (after retries) is one
failure row of its own (`unreadable`: the next run lists it again), not a failed job. The driver receives one small
descriptor per wave: its memory grows with the number of waves, not of objects.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import posixpath
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mcs_batch.errors import ConfigError, ErrorCode
from mcs_batch.io import dicomweb
from mcs_batch.io.discover import check_inputs, input_key_root, matches, unique_inputs
from mcs_batch.io.storage import StorageOptions, filesystem_for, protocol_of, relative_key, to_uri
from mcs_batch.outputs.index import ArchiveIndex
from mcs_batch.records import CaseKind, failed_record

WAVE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("rel", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("version", pa.string()),  # ETag on object stores, mtime on file systems
        pa.field("prefix_id", pa.string()),
        pa.field("payload", pa.string()),  # the indexed probe result when unchanged, else ""
    ]
)


@dataclass(frozen=True)
class Prefix:
    """One unit of listing: a folder under an input, listed recursively, or an input's own files."""

    input_uri: str
    root: str  # the input's folder on its filesystem (include / exclude match keys relative to it)
    path: str  # what to list
    recursive: bool  # False: only the files directly in `path` (or `path` itself when it is a file)
    key_root: str  # keys are relative to it: the folder above the input (io/discover.input_key_root)

    @property
    def prefix_id(self) -> str:
        """Stable name of this prefix in the archive index (same input, same id, every run). The key
        scheme is part of it: index entries made under another scheme carry other case ids."""
        text = f"{self.input_uri.rstrip('/')}|{relative_key(self.path, self.root)}|{int(self.recursive)}|named-keys"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Wave:
    """A slice of the archive in key order, as listed: `path` holds its objects (WAVE_SCHEMA)."""

    index: int
    path: str  # a Parquet file under the run's staging folder (URI)
    objects: int
    cached: int  # of which the index already knows the header


def top_prefixes(inputs: Sequence[str], *, storage: StorageOptions | None) -> list[Prefix]:
    """The listing units of every input (driver side: one `ls` per input).

    Raises ConfigError when an input does not exist or cannot be listed (unreachable bucket, missing
    credentials): a job-level problem, said in one line.
    """
    prefixes: list[Prefix] = []
    located: list[tuple[str, str, str, str]] = []
    seen_series: set[tuple[str, str]] = set()  # DICOMweb series already listed by an earlier input
    for uri in unique_inputs(inputs):
        fs, root = filesystem_for(uri, storage)
        try:
            if protocol_of(uri) in dicomweb.SCHEMES:  # the query's series, each listed by a task
                series = sorted(e["name"] for e in dicomweb.check_root(uri, fs) if e["type"] == "directory")
                series = [s for s in series if (protocol_of(uri), s) not in seen_series]  # two queries, one series
                seen_series.update((protocol_of(uri), s) for s in series)
                key_root = input_key_root(root.partition("?")[0])
                located.append((uri, protocol_of(uri), root, key_root))
                prefixes.extend(Prefix(uri, root, s, recursive=True, key_root=key_root) for s in series)
                continue
            if fs.isfile(root):
                folder = root.rsplit("/", 1)[0]
                located.append((uri, protocol_of(uri), root, input_key_root(folder)))
                prefixes.append(Prefix(uri, folder, root, recursive=False, key_root=input_key_root(folder)))
                continue
            entries = fs.ls(root, detail=True)
        except ConfigError:
            raise
        except FileNotFoundError as e:
            raise ConfigError(f"{uri}: input does not exist") from e
        except Exception as e:  # botocore / aiohttp errors: unreachable endpoint, denied, ...
            raise ConfigError(f"{uri}: cannot list input ({type(e).__name__}: {e})") from e
        if not entries and not fs.exists(root):
            raise ConfigError(f"{uri}: input does not exist")
        folders = sorted(e["name"] for e in entries if e.get("type") == "directory")
        key_root = input_key_root(root)
        located.append((uri, protocol_of(uri), root, key_root))
        if any(e.get("type", "file") == "file" for e in entries):
            prefixes.append(Prefix(uri, root, root, recursive=False, key_root=key_root))
        prefixes.extend(Prefix(uri, root, folder, recursive=True, key_root=key_root) for folder in folders)
    check_inputs(located)
    return prefixes


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "version"):  # version: io/dicomweb.py
        if info.get(key):
            return str(info[key]).strip('"')
    return ""


def list_prefix_objects(
    prefix: Prefix, *, storage: StorageOptions | None, include: Sequence[str], exclude: Sequence[str]
) -> list[dict]:
    """Every object under one prefix (filtered), sorted by key: uri, rel, size, version."""
    fs, _ = filesystem_for(prefix.input_uri, storage)
    if prefix.recursive:
        found = fs.find(prefix.path, detail=True)
    elif fs.isfile(prefix.path):
        found = {prefix.path: fs.info(prefix.path)}
    else:
        found = {e["name"]: e for e in fs.ls(prefix.path, detail=True)}
    rows = []
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        if matches(relative_key(path, prefix.root), include, exclude):
            rows.append({"uri": to_uri(fs, path), "rel": relative_key(path, prefix.key_root),
                         "size": int(info.get("size") or 0), "version": _version(info)})  # fmt: skip
    return sorted(rows, key=lambda r: r["uri"])


def split_into_waves(rows: list[dict], wave_objects: int) -> list[list[dict]]:
    """Consecutive runs of rows (sorted by key) of `wave_objects` to 2 x `wave_objects` objects, cut
    between folders where one ends in that range, else inside a folder (a series cut there is still
    assembled once: the grouper waits for the next wave before releasing it)."""
    waves: list[list[dict]] = []
    current: list[dict] = []
    folder = None
    for row in rows:
        row_folder = posixpath.dirname(row["rel"])
        full = len(current) >= wave_objects and (row_folder != folder or len(current) >= 2 * wave_objects)
        if current and full:
            waves.append(current)
            current = []
        current.append(row)
        folder = row_folder
    if current:
        waves.append(current)
    return waves


LIST_ATTEMPTS = 3  # a prefix whose listing fails is tried again, after 1 s, then 2 s


def _listed(p: Prefix, *, storage, include, exclude) -> list[dict]:
    """list_prefix_objects, or, when storage keeps failing, one row standing for the whole prefix: a
    failure (`unreadable`, transient) that the grouper passes on and the next run lists again. The
    other prefixes of the archive go on."""
    for attempt in range(LIST_ATTEMPTS):
        try:
            return list_prefix_objects(p, storage=storage, include=include, exclude=exclude)
        except Exception as e:
            error = e
            if attempt + 1 < LIST_ATTEMPTS:
                time.sleep(2**attempt)
    fs, _ = filesystem_for(p.input_uri, storage)
    uri, rel = to_uri(fs, p.path), relative_key(p.path, p.key_root)
    message = " ".join(f"{uri}: cannot list ({type(error).__name__}: {error})".split())[:300]
    record = failed_record(f"prefix:{rel}", CaseKind.UNKNOWN, uri, rel, ErrorCode.UNREADABLE, message)
    return [{"uri": uri, "rel": rel, "size": 0, "version": "", "payload": json.dumps({"record": record.to_row()})}]


def list_prefix(
    prefix: dict,
    *,
    storage: StorageOptions | None,
    include: Sequence[str],
    exclude: Sequence[str],
    wave_objects: int,
    index_uri: str,
    staging_uri: str,
) -> list[dict]:
    """Ray task: list one prefix, look its objects up in the index, write its waves; returns their
    descriptors (path, objects, cached) in key order."""
    p = Prefix(**prefix)
    rows = _listed(p, storage=storage, include=include, exclude=exclude)
    known = ArchiveIndex(index_uri, storage=storage).read_prefix(p.prefix_id)
    cached = 0
    for row in rows:
        if row.get("payload"):  # the prefix could not be listed: its failure row
            row["prefix_id"] = p.prefix_id
            continue
        entry = known.get(row["uri"])
        hit = entry is not None and row["version"] and entry["version"] == row["version"]
        hit = hit and entry["size"] == row["size"]
        row["payload"] = entry["payload"] if hit else ""
        row["prefix_id"] = p.prefix_id
        cached += bool(hit)
    out_fs, out_root = filesystem_for(staging_uri, storage)
    out_fs.makedirs(out_root, exist_ok=True)
    waves = []
    for n, wave in enumerate(split_into_waves(rows, wave_objects)):
        path = posixpath.join(out_root, f"wave-{p.prefix_id}-{n:06d}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(wave, schema=WAVE_SCHEMA), sink, compression="zstd")
        out_fs.pipe_file(path, sink.getvalue().to_pybytes())
        waves.append(
            {"path": to_uri(out_fs, path), "objects": len(wave), "cached": sum(bool(r["payload"]) for r in wave)}
        )
    return waves


def list_archive(
    inputs: Sequence[str],
    *,
    storage: StorageOptions | None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    wave_objects: int,
    index_uri: str,
    staging_uri: str,
) -> list[Wave]:
    """All waves of the inputs, in key order: one listing task per top-level prefix, run in parallel."""
    import ray

    prefixes = top_prefixes(inputs, storage=storage)
    task = ray.remote(num_cpus=0.25, max_retries=3)(list_prefix)
    kwargs = {"storage": storage, "include": tuple(include), "exclude": tuple(exclude), "wave_objects": wave_objects,
              "index_uri": index_uri, "staging_uri": staging_uri}  # fmt: skip
    refs = [task.remote(p.to_dict(), **kwargs) for p in prefixes]
    waves: list[Wave] = []
    for prefix_waves in ray.get(refs):
        for w in prefix_waves:
            waves.append(Wave(len(waves), w["path"], w["objects"], w["cached"]))
    return waves


def read_wave(batch: dict, *, storage: StorageOptions | None, rows_per_block: int):
    """map_batches generator: wave descriptors -> their objects, in blocks of `rows_per_block` rows,
    each row tagged with its wave index."""
    for wave, path in zip(batch["wave"], batch["path"], strict=True):
        fs, file_path = filesystem_for(str(path), storage)
        with fs.open(file_path, "rb") as f:
            table = pq.read_table(f, schema=WAVE_SCHEMA)
        table = table.append_column("wave", pa.array([int(wave)] * table.num_rows, pa.int64()))
        for offset in range(0, table.num_rows, rows_per_block):
            yield table.slice(offset, rows_per_block)


LOOKAHEAD_WAVES = 2  # waves a shard reads after its own (a series crossing the cut ends in the first)


@dataclass(frozen=True)
class ShardWaves:
    """Shard i of N of the listed archive: `waves` (renumbered from 0) are what its scan reads, `own`
    the range of them [lo, hi) whose objects it owns. Around its own waves it reads the wave before
    (a series that began there belongs to the shard before) and two waves after (a series of its own
    that goes on past the cut is completed from them): archive/grouping.CaseGrouper decides by the
    wave of a series' first file, so a series crossing a cut is one case, of one shard. `unread_after`:
    the archive goes on after the last wave read (a series of this shard with files in that wave may
    go on too, and fails rather than be assembled with slices missing)."""

    waves: list[Wave]
    own: tuple[int, int]
    objects: int  # objects owned
    unread_after: bool = False


def shard_waves(waves: Sequence[Wave], shard: int, shards: int) -> ShardWaves:
    """Shard `shard` (0-based) of `shards`: contiguous runs of waves in key order with about the same
    number of objects, cut only between waves (which are cut between folders where they can).
    Deterministic: every driver that lists the same archive cuts it the same way."""
    ends = list(itertools.accumulate(w.objects for w in waves))  # objects up to the end of each wave
    total = ends[-1] if ends else 0
    cuts = [0]
    for k in range(1, shards):  # the wave boundary nearest to k / N of the objects (never behind the last cut)
        best = min(range(cuts[-1], len(waves) + 1), key=lambda n: abs((ends[n - 1] if n else 0) - total * k / shards))
        cuts.append(best)
    cuts.append(len(waves))
    lo, hi = cuts[shard], cuts[shard + 1]
    if lo == hi:  # more shards than waves: nothing here
        return ShardWaves([], (0, 0), 0)
    first, last = max(0, lo - 1), min(len(waves), hi + LOOKAHEAD_WAVES)
    read = [Wave(n, w.path, w.objects, w.cached) for n, w in enumerate(waves[first:last])]
    return ShardWaves(read, (lo - first, hi - first), sum(w.objects for w in waves[lo:hi]), last < len(waves))
