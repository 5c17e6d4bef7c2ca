"""Grouping probed objects into cases as they stream in, without waiting for the whole archive.

Every object that is not DICOM (NIfTI, PNG/JPEG, unreadable, ...) is a case of its own and leaves at
once. DICOM headers are held per SeriesInstanceUID until the series is complete, judged by waves (the
archive in key order, cut between folders, see listing.py): a series is released once every wave up to
the one after its last file has been probed. A series whose files are contiguous in key order (one
folder, or neighbouring folders: how archives are laid out) is therefore assembled once, with all its
files, while later waves are still being read. Files of an already released series that turn up
further on (a series scattered across the archive) become failure rows naming the reason, never a
second case with the same id. A series committed before with another instance set (files still
arriving then) is redone, and its new rows replace the old ones (outputs/catalog.CommittedPairs).

An object that could not be read (a storage failure: unreadable, transient) may have been a file of a
series: a series volume with a file in a folder where a read failed is not assembled from the files
that were read (it would be ok with a slice missing, for good) but fails `unreadable` too, and the next
run, which reads the object again, assembles it whole. One bad row (a header no code path expected)
fails that object, never the block.

CaseGrouper is a Ray Data actor of a pool of size one (it holds the open series), placed on the
driver's node. In a job, cases with nothing to segment (skipped, failed at the scan) leave through the
job's board to the driver instead of flowing past the model actors. It also appends what it learnt to
the archive index and reports progress to the job's board.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections import defaultdict

import pyarrow as pa

from mcs_batch.errors import TRANSIENT_CODES, CaseError, ErrorCode
from mcs_batch.io.dicom_header import DicomHeader
from mcs_batch.io.limits import SizeLimits, check_size
from mcs_batch.io.series import cases_from_headers
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog, CommittedPairs
from mcs_batch.outputs.index import ArchiveIndex
from mcs_batch.outputs.schema import manifest_table
from mcs_batch.records import CaseKind, CaseRecord, Status, failed_record, instances_digest
from mcs_batch.rows import case_row

INDEX_FLUSH_ROWS = 5000  # index rows buffered per prefix before a part is written
# Probe results the index keeps: not transient failures (the next run reads the object again), nor a
# size judged against this run's limits (the limits are applied to every case as it leaves, cached or not).
_NOT_INDEXED = TRANSIENT_CODES | {ErrorCode.TOO_LARGE}


def _storable(record: CaseRecord) -> CaseRecord:
    """The record, or its failure when Arrow cannot store it (a value past its type): a bug's trace
    in one row, never a failed block."""
    try:
        manifest_table([record.to_row()])
        return record
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
        uri = record.source_uris[0] if record.source_uris else record.case_id
        message = f"{uri}: record cannot be stored ({type(e).__name__}: {e})"[:300]
        return CaseRecord(case_id=record.case_id, kind=record.kind, source_uris=record.source_uris,
                          source_keys=record.source_keys, status=Status.FAILED, error_code=ErrorCode.INTERNAL_ERROR,
                          error_message=message)  # fmt: skip


def cases_of_series(headers: list[DicomHeader]) -> list[CaseRecord]:
    """All cases of one series' headers; a bug fails the series' objects (one row each), never loses them."""
    try:
        return cases_from_headers(headers)
    except Exception as e:
        code = e.code if isinstance(e, CaseError) else ErrorCode.INTERNAL_ERROR
        return [
            failed_record(
                f"file:{h.rel}", CaseKind.DICOM_SERIES, h.uri, h.rel, code, f"{h.uri}: {type(e).__name__}: {e}"
            )
            for h in headers
        ]


class CaseGrouper:
    """Probe rows (archive/probe.py) in, case rows (the manifest schema) out, as series complete.

    wave_sizes: objects per wave, in wave order (the job's listing). committed_out: for a segmentation
    job, its OUT: cases whose every target is done there are dropped (counted as skipped), others carry
    the targets already done in `done_targets` and, in `redo` (JSON: target -> {replaces, attempts,
    history}), the committed rows their new ones replace: a retried failure, a grown series (files
    arrived or left since its commit). None for `scan`, which keeps every case. The catalog is read
    once, here (CommittedPairs): the driver never loads it.
    """

    def __init__(
        self,
        wave_sizes: list[int],
        *,
        index_uri: str,
        run_id: str,
        storage: StorageOptions | None = None,
        committed_out: str | None = None,
        targets: tuple[str, ...] = (),
        board: str | None = None,
        divert_unsegmented: bool = False,
        limits: SizeLimits | None = None,
        slice_axis: int = 2,
        max_attempts: int = 3,
        retry_failed: bool = False,
        own: tuple[int, int] | None = None,
        unread_after: bool = False,
    ):
        self.expected = list(wave_sizes)
        # a shard driver's grouper (archive/listing.ShardWaves): the waves [lo, hi) are its own; a series
        # is its own when its first file is in them, an object of its own when it is in them
        self.own, self.unread_after = own or (0, len(self.expected)), unread_after
        self.first_wave: dict[str, int] = {}
        self.foreign: set[str] = set()  # series released as another shard's
        self.limits, self.slice_axis = limits or SizeLimits(), slice_axis
        self.unreadable: dict[str, list[str]] = defaultdict(list)  # folder -> keys of objects storage failed
        self.divert = divert_unsegmented and bool(board)
        self.seen = [0] * len(self.expected)
        self.frontier = 0  # the first wave not yet fully probed
        self._advance()
        self.open: dict[str, list[DicomHeader]] = defaultdict(list)
        self.open_index: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        self.last_wave: dict[str, int] = {}
        self.released: set[str] = set()
        self.index = ArchiveIndex(index_uri, storage=storage)
        self.index_rows: dict[str, list[dict]] = defaultdict(list)
        self.index_seq = 0
        self.run_id = run_id
        self.targets = frozenset(targets)
        self.committed: CommittedPairs | None = None
        if committed_out is not None:
            self.committed = CommittedPairs(Catalog(committed_out, storage=storage).committed_state(),
                                            max_attempts=max_attempts, retry_failed=retry_failed)  # fmt: skip
        self.board = None
        if board:
            import ray

            self.board = ray.get_actor(board)
            context = ray.get_runtime_context()
            info = {"stage": "grouper", "node": context.get_node_id(), "pid": os.getpid(), "gpu_ids": []}
            self.board.register_actor.remote(info, context.current_actor)
        self.counts = {"probed": 0, "cached": 0, "cases": 0, "skipped_committed": 0}
        self.scan_finished = False

    # -- the stream ---------------------------------------------------------------------------------
    def __call__(self, table: pa.Table) -> pa.Table:
        out: list[CaseRecord] = []
        delta = {"objects": table.num_rows, "probed": 0, "cached": 0}
        for row in table.to_pylist():
            self.seen[row["wave"]] += 1
            delta["probed" if row["probed"] else "cached"] += 1
            try:
                self._take(row, out)
            except Exception as e:  # one row no code path expected fails its object, not the block
                message = f"{row['uri']}: grouping: {type(e).__name__}: {e}"[:300]
                out.append(failed_record(f"file:{row['rel']}", CaseKind.UNKNOWN, row["uri"], row["rel"],
                                         ErrorCode.INTERNAL_ERROR, message))  # fmt: skip
        if self._advance() or self.frontier == len(self.expected):
            out.extend(self._release())
        if self.frontier == len(self.expected):
            self._flush_index(force=True)
            if not self.scan_finished:
                self.scan_finished = True
                delta["scan_finished_at"] = time.time()
        else:
            self._flush_index()
        kept = self._not_committed(out, delta)
        self._report(delta)  # counted planned before any of them reaches the driver (board.poll)
        if self.divert:
            to_board = [case_row(r, 0, done, old)["case_json"] for r, done, old in kept if r.status != Status.OK]
            kept = [(r, done, old) for r, done, old in kept if r.status == Status.OK]
            if to_board:  # waited for: the driver drains the board once the stream has ended
                import ray

                ray.get(self.board.add_unsegmented.remote(to_board))
        return self._table(kept)

    def _take(self, row: dict, out: list[CaseRecord]) -> None:
        """One probed object: a finished record goes out; a DICOM header waits for its series."""
        index_row = None
        if row["probed"]:
            index_row = {k: row[k] for k in ("uri", "rel", "size", "version", "payload")}
        item = json.loads(row["payload"])
        mine = self.own[0] <= row["wave"] < self.own[1]
        if "record" in item:
            record = CaseRecord.from_row(item["record"])
            if record.error_code == ErrorCode.UNREADABLE:  # beside a series of this shard's too
                self.unreadable[posixpath.dirname(row["rel"])].append(row["rel"])
            if not mine:
                return  # an object of a neighbouring shard's waves: that shard's (and its index rows)
            if record.error_code in _NOT_INDEXED:
                index_row = None  # read again next run
            self._index(row["prefix_id"], index_row, record.case_id)
            out.append(record)
            return
        header = DicomHeader.from_dict(item["header"])
        uid = header.series_uid
        if not mine and not uid:
            return
        if not uid:  # a DICOM object without a series: a case of its own
            records = cases_of_series([header])
            self._index(row["prefix_id"], index_row, records[0].case_id if records else None)
            out.extend(records)
        elif uid in self.foreign:
            return
        elif uid in self.released:
            out.append(self._late(header))
            self._index(row["prefix_id"], index_row, out[-1].case_id)
        else:
            self.open[uid].append(header)
            self.open_index[uid].append((row["prefix_id"], index_row))
            self.last_wave[uid] = max(self.last_wave.get(uid, -1), row["wave"])
            self.first_wave[uid] = min(self.first_wave.get(uid, row["wave"]), row["wave"])

    def _advance(self) -> bool:
        before = self.frontier
        while self.frontier < len(self.expected) and self.seen[self.frontier] >= self.expected[self.frontier]:
            self.frontier += 1
        return self.frontier != before

    def _release(self) -> list[CaseRecord]:
        """Series whose last file is at least one fully probed wave behind the frontier (all when done)."""
        everything = self.frontier == len(self.expected)
        ready = [uid for uid, last in self.last_wave.items() if everything or last + 1 < self.frontier]
        out = []
        for uid in ready:
            if not self.own[0] <= self.first_wave.pop(uid) < self.own[1]:  # it began in another shard's waves
                self.open.pop(uid), self.open_index.pop(uid), self.last_wave.pop(uid)
                self.foreign.add(uid)
                continue
            records = [self._unless_incomplete(r) for r in cases_of_series(self.open.pop(uid))]
            records = [self._unless_cut(r, self.last_wave[uid]) for r in records]
            case_of = {uri: r.case_id for r in records for uri in r.source_uris}
            for prefix_id, index_row in self.open_index.pop(uid):
                if index_row is not None:
                    self._index(prefix_id, index_row, case_of.get(index_row["uri"]))
            del self.last_wave[uid]
            self.released.add(uid)
            out.extend(records)
        return out

    def _unless_incomplete(self, record: CaseRecord) -> CaseRecord:
        """A series volume with a file in a folder where storage failed a read is not assembled from
        the files that were read: it fails `unreadable` (transient), and the next run reads it whole.
        (Checked when the series is released: a failure in the wave after its last file counts too.)"""
        if record.kind != CaseKind.DICOM_SERIES or record.status != Status.OK:
            return record
        failed = sorted({k for key in record.source_keys for k in self.unreadable.get(posixpath.dirname(key), ())})
        if not failed:
            return record
        record.status, record.error_code = Status.FAILED, ErrorCode.UNREADABLE
        record.error_message = (
            f"series {record.series_uid}: {len(failed)} object(s) beside its files could not be read "
            f"({', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}): it may be incomplete; the next run "
            "reads them again"
        )
        return record

    def _unless_cut(self, record: CaseRecord, last_wave: int) -> CaseRecord:
        """A series of this shard with files in the last wave it reads, when the archive goes on after
        that wave, may go on too: it fails (naming the cut) rather than be assembled with slices missing.
        Only a series longer than the wave after the cut can (listing.LOOKAHEAD_WAVES)."""
        if not self.unread_after or last_wave != len(self.expected) - 1 or record.status != Status.OK:
            return record
        record.status, record.error_code = Status.FAILED, ErrorCode.INCONSISTENT_SERIES
        record.error_message = (
            f"series {record.series_uid}: its files go on past the waves read after this shard's cut: run "
            "with fewer shards (resources.drivers) or larger waves (inputs.wave_objects)"
        )
        return record

    def _late(self, header: DicomHeader) -> CaseRecord:
        return failed_record(
            f"file:{header.rel}", CaseKind.DICOM_SERIES, header.uri, header.rel, ErrorCode.INCONSISTENT_SERIES,
            f"{header.uri}: a file of series {header.series_uid} found far (in key order) from the rest of the "
            "series, which was already segmented; move it beside the series' other files and re-run",
        )  # fmt: skip

    # -- committed pairs, index, board --------------------------------------------------------------
    def _not_committed(self, records: list[CaseRecord], delta: dict) -> list[tuple[CaseRecord, list[str], dict]]:
        """(record, targets done, redo: target -> the committed row its new one replaces)."""
        kept = []
        for record in records:
            record = self._within_limits(record)
            done: set[str] = set()
            redo: dict[str, dict] = {}
            if self.committed is not None:
                done, redo, grown = self.committed.judge(record.case_id, instances_digest(record), self.targets)
                if grown:
                    delta["grown_series"] = delta.get("grown_series", 0) + 1
                if redo:
                    delta["redone"] = delta.get("redone", 0) + len(redo)
                # an object that failed as a case of its own before and is now part of this one: its row goes
                failures = self.committed.object_failures(record.case_id, record.source_keys, self.targets - done)
                for target, rows in failures.items():
                    redo.setdefault(target, {"replaces": None, "attempts": 0, "history": []})["absorbs"] = rows
            if self.targets and self.targets <= done:
                delta["skipped_committed"] = delta.get("skipped_committed", 0) + 1
                delta["skipped_objects"] = delta.get("skipped_objects", 0) + len(record.source_uris)
                continue
            kept.append((record, sorted(done & self.targets), redo))
        delta["cases"] = len(kept)
        return kept

    def _within_limits(self, record: CaseRecord) -> CaseRecord:
        """check_size, and a record whose size cannot be judged fails on its own."""
        try:
            return check_size(record, self.limits, self.slice_axis)
        except Exception as e:
            record.status, record.error_code = Status.FAILED, ErrorCode.INTERNAL_ERROR
            record.error_message = f"{record.case_id}: cannot judge the case's size ({type(e).__name__}: {e})"[:300]
            return record

    def _index(self, prefix_id: str, row: dict | None, case_id: str | None) -> None:
        if row is not None:
            self.index_rows[prefix_id].append({**row, "case_id": case_id})

    def _flush_index(self, force: bool = False) -> None:
        for prefix_id in list(self.index_rows):
            rows = self.index_rows[prefix_id]
            if rows and (force or len(rows) >= INDEX_FLUSH_ROWS):
                self.index.append(prefix_id, rows, run_id=self.run_id, seq=self.index_seq)
                self.index_seq += 1
                del self.index_rows[prefix_id]

    def _report(self, delta: dict) -> None:
        """The board has counted `delta` when this returns. Not fire and forget: Ray Data kills this
        actor as soon as its last block is out, and a call still queued in its process would be lost
        with it (not reproduced here: 12 groupers killed right after a report, 12 counted either way).
        One round trip per block, against a wave of objects grouped."""
        if self.board is not None:
            import ray

            ray.get(self.board.scan_progress.remote(delta))

    def _table(self, kept: list[tuple[CaseRecord, list[str], dict]]) -> pa.Table:
        try:
            table = manifest_table([r.to_row() for r, _, _ in kept])
        except (pa.ArrowException, OverflowError, TypeError, ValueError):  # one record Arrow refuses
            kept = [(_storable(r), d, o) for r, d, o in kept]
            table = manifest_table([r.to_row() for r, _, _ in kept])
        table = table.append_column("done_targets", pa.array([d for _, d, _ in kept], pa.list_(pa.string())))
        redo = [json.dumps(old) if old else "" for _, _, old in kept]
        return table.append_column("redo", pa.array(redo, pa.string()))
