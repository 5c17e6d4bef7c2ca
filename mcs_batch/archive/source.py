"""The archive as a stream of case rows (Ray Data): waves -> objects -> probed headers -> cases.

    waves (one row each)
      -> scan_wave (a task per wave, in parallel): its objects, headers read only where the index
         does not know them
      -> CaseGrouper (one actor on the driver's node; releases cases as series complete)

No barrier: cases of the first waves flow on to segmentation while later waves are still probed.
"""

from __future__ import annotations

from collections.abc import Sequence

from mcs_batch.archive.grouping import CaseGrouper
from mcs_batch.archive.listing import Wave, read_wave
from mcs_batch.archive.probe import probe_block
from mcs_batch.io.limits import SizeLimits
from mcs_batch.io.storage import StorageOptions

PROBE_BATCH = 256  # objects probed at a time within a wave (threads overlap their reads)


def scan_wave(batch: dict, *, storage: StorageOptions | None):
    """map_batches generator: one wave -> its objects, probed. A task per wave: waves are the scan's
    parallel unit; within a task, reads overlap in threads on object stores."""
    for table in read_wave(batch, storage=storage, rows_per_block=PROBE_BATCH):
        yield probe_block(table, storage=storage)


def cases_stream(
    waves: Sequence[Wave],
    *,
    storage: StorageOptions | None,
    index_uri: str,
    run_id: str,
    committed_out: str | None = None,
    targets: tuple[str, ...] = (),
    board: str | None = None,
    probe_cpus: float = 0.25,
    scan_tasks: int | None = None,
    divert_unsegmented: bool = False,
    limits: SizeLimits | None = None,
    slice_axis: int = 2,
    max_attempts: int = 3,
    retry_failed: bool = False,
    own: tuple[int, int] | None = None,
    unread_after: bool = False,
):
    """A lazy Dataset of case rows (manifest schema + done_targets, redo) for the listed waves.
    divert_unsegmented (a job, with a board): cases with nothing to segment go to the board, not the
    stream (archive/board.py). limits, slice_axis: the job's size limits (io/limits.py; default ones for
    `scan`), applied to every case as the grouper lets it go. max_attempts, retry_failed: which
    committed failures the job redoes (outputs/catalog.CommittedPairs). own: a shard driver's own waves
    among `waves` and whether the archive goes on after them (archive/listing.ShardWaves; None: all).

    scan_tasks caps the waves scanned at once (None: as many as the CPUs allow), so that on a small
    cluster the scan does not take the CPUs the first cases need to be segmented."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    items = [{"wave": w.index, "path": w.path} for w in waves]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    probed = ds.map_batches(
        scan_wave,
        fn_kwargs={"storage": storage},
        batch_size=1,
        num_cpus=probe_cpus,
        compute=ray.data.TaskPoolStrategy(size=scan_tasks) if scan_tasks else None,
    )
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return probed.map_batches(
        CaseGrouper,
        fn_constructor_args=([w.objects for w in waves],),
        fn_constructor_kwargs={
            "index_uri": index_uri,
            "run_id": run_id,
            "storage": storage,
            "committed_out": committed_out,
            "targets": tuple(targets),
            "board": board,
            "divert_unsegmented": divert_unsegmented,
            "limits": limits,
            "slice_axis": slice_axis,
            "max_attempts": max_attempts,
            "retry_failed": retry_failed,
            "own": own,
            "unread_after": unread_after,
        },
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.1,
        ray_remote_args_fn=lambda: {"scheduling_strategy": here, "max_restarts": 0},
    )
