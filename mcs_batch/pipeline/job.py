"""The cohort segmentation job: an archive streamed through the models into masks and a catalog.

    list the archive in parallel tasks into waves            archive/listing.py
    waves -> probe headers -> group into cases (streaming)   archive/source.py
      -> plan -> load -> saliency -> prompts -> masking -> parts   graph.py (mcs_batch.stages)
      -> driver: count slices per case, assemble finished cases in the cluster, commit   writer.py

Nothing on the driver grows with the archive: it holds one descriptor per wave and the cases in flight.
The run record (OUT/runs/<run_id>.json) holds the resolved resources, the model actors that ran (with
the GPU ids Ray gave them), the scan's counts (header reads vs headers reused from the index), when
the scan finished and the first commit landed, each stage's first and last activity, and Ray Data's
own per-operator statistics.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from mcs_batch.archive.board import start_board
from mcs_batch.archive.listing import Wave, list_archive, shard_waves, top_prefixes
from mcs_batch.archive.source import cases_stream
from mcs_batch.cluster import forget_stop, stoppable
from mcs_batch.config import JobConfig
from mcs_batch.errors import ConfigError
from mcs_batch.faults import crash_hook
from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.outputs.catalog import Catalog, new_run_id
from mcs_batch.outputs.lease import RunHeartbeat
from mcs_batch.pipeline.finish import maintain_tables, store_segs, submit_retraining
from mcs_batch.pipeline.graph import ModelStages, build_pipeline
from mcs_batch.pipeline.preflight import check_configuration, clean_up_dead_runs, package_versions
from mcs_batch.pipeline.resources import Resolved, await_gpus, cluster_view, drivers_for, resolve
from mcs_batch.pipeline.shards import run_sharded
from mcs_batch.pipeline.writer import CaseWriter, JobAborted, JobSummary
from mcs_batch.telemetry import JobMetrics

PROGRESS_SECONDS = 10.0
POLL_SECONDS = 0.25  # how often the driver looks at finished assemblies while no rows arrive
NODE_CHECK_SECONDS = 2.0  # how often the driver checks that no node of the cluster has died
MAX_ATTEMPTS = 4  # a run plans again after losing nodes, this many times at most
SCAN_CPU_SHARE = 4  # waves scanned at once: one per this many CPUs of the cluster (each with I/O threads)


_END = object()


def _batches(ds, poll_seconds: float) -> Iterator[dict | None]:
    """Ray Data's batches, iterated in a thread; None every `poll_seconds` without one, so that the
    driver can take in finished assemblies and commit while the models work."""
    items: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        iterator = ds.iter_batches(batch_size=None, batch_format="numpy")
        try:
            for batch in iterator:
                if not put(batch):
                    return
            put(_END)
        except BaseException as e:  # re-raised in the driver's thread
            put(e)

    thread = threading.Thread(target=pump, name="mcs-batch-rows", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=poll_seconds)
            except queue.Empty:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


_OPERATOR = re.compile(
    r"^Operator \d+ (?P<name>.+): (?P<tasks>\d+) tasks executed, (?P<blocks>\d+) blocks produced in (?P<wall>[\d.]+)s"
)


def ray_data_stats(ds) -> dict:
    """Per-operator task and block counts and wall time, from Ray Data's own statistics."""
    try:
        text = ds.stats()
    except Exception as e:  # statistics must never fail a job
        return {"error": f"{type(e).__name__}: {e}"}
    operators = []
    for line in text.splitlines():
        m = _OPERATOR.match(line.strip())
        if m:
            operators.append({"name": m["name"], "tasks": int(m["tasks"]), "blocks": int(m["blocks"]),
                              "wall_s": float(m["wall"])})  # fmt: skip
        elif line.strip().startswith("* Tasks per node") and operators:
            operators[-1]["nodes"] = line.strip().split(";")[-1].strip()
    return {"operators": operators, "text": text}


def run_job(
    cfg: JobConfig,
    *,
    storage: StorageOptions | None = None,
    retry_failed: bool = False,
    progress: Callable[[str], None] = print,
    stages: ModelStages | None = None,
    stop: threading.Event | None = None,
    run_id: str | None = None,
    metrics: JobMetrics | None = None,
    parent: str | None = None,
    listed: list[Wave] | None = None,
) -> JobSummary:
    """Run the job on the current Ray cluster (ray.init() must have been called). Other jobs may write
    the same OUT at once: each pair is committed once (outputs/catalog.py). stop: set by the caller (a
    long-lived process, a test), the job stops within POLL_SECONDS as an attempt that lost nodes does
    (its actors killed, what is assembled committed) and ends `aborted`.

    With more than one driver (resources.drivers, auto from the cluster's GPUs) the job runs as shard
    drivers (pipeline/shards.py), each calling this for its shard (resources.shard) with its run id,
    its metrics (summed by the parent), the parent's run id and the parent's listing (`listed`: every
    shard cuts the same listing, whatever arrives in the archive meanwhile)."""
    start = time.perf_counter()
    if not cfg.inputs.uris:
        raise ConfigError("inputs.uris: no inputs given")
    top_prefixes(cfg.inputs.uris, storage=storage)  # missing, unreachable or overlapping inputs: before OUT is
    # touched (a job that cannot read its inputs leaves no trace there)
    if cfg.resources.shard_spec() is None:
        drivers = drivers_for(cfg.resources, cluster_view())
        if drivers > 1:
            return run_sharded(cfg, drivers, job=run_job, storage=storage, retry_failed=retry_failed,
                               progress=progress, stages=stages, stop=stop)  # fmt: skip
    run_id = run_id or new_run_id()
    catalog = Catalog(cfg.outputs.uri, storage=storage, owner=run_id)
    catalog.check_writable()  # an unmigrated, newer or unwritable catalog: one line, nothing written
    heartbeat = RunHeartbeat(catalog, run_id)
    try:
        heartbeat.start()
    except Exception as e:  # denied, read-only, unreachable endpoint: said in one line
        raise ConfigError(f"{cfg.outputs.uri}: cannot write the output folder ({type(e).__name__}: {e})") from e
    catalog.crash_hook = crash_hook(cfg.testing, lambda: catalog.commits)
    try:
        return _run(cfg, catalog, run_id, start, storage=storage, retry_failed=retry_failed, progress=progress,
                    stages=stages, stop=stop, metrics=metrics, parent=parent, listed=listed,
                    fenced=lambda: heartbeat.fenced(cfg.outputs.heartbeat_ttl_seconds))  # fmt: skip
    finally:
        heartbeat.stop()


def _run(cfg, catalog, run_id, start, *, storage, retry_failed, progress, stages, stop, metrics=None,
         parent=None, listed=None, fenced=lambda: None) -> JobSummary:  # fmt: skip
    """The job, once its heartbeat beats."""
    import ray

    clean_up_dead_runs(catalog, cfg, run_id, progress)
    config_hash = check_configuration(catalog, cfg)
    shard = cfg.resources.shard_spec()
    summary = JobSummary(run_id=run_id, out=cfg.outputs.uri, config_hash=config_hash, tiny_models=cfg.models.tiny)
    resources = resolve(cfg.resources, cluster_view(), shard)
    if resources.gpus > 0 and not resources.cluster["gpus"]:
        await_gpus(resources.gpus, cfg.resources.gpu_wait_seconds, progress)
        resources = resolve(cfg.resources, cluster_view(), shard)
    document = {
        "run_id": run_id,
        "status": "running",
        "started_at": datetime.now(UTC).isoformat(),
        "config": cfg.to_dict(),
        "config_hash": config_hash,
        "packages": package_versions(),
        "tiny_models": cfg.models.tiny,
        "resources": resources.to_dict(),
        "attempts": [],
    }
    if shard is not None:
        document["shard"] = {"shard": f"{shard[0] + 1}/{shard[1]}", "parent": parent}
    if metrics is None:  # a port in use stops the job before its run record
        metrics = JobMetrics(cfg.outputs.metrics_port, cfg.outputs.metrics_linger_seconds)
    summary.run_uri = catalog.write_run(run_id, document)
    index_uri = cfg.inputs.index or join(cfg.outputs.uri, "index")
    staging = catalog.uri("staging", run_id)
    board_name = f"mcs-batch-board-{run_id}"
    board = start_board(board_name)
    writer = CaseWriter(catalog, cfg, run_id, summary, metrics, storage=storage, resources=resources, fenced=fenced)
    try:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if attempt > 1:  # the cluster changed under the previous attempt: plan again on what is there
                resources = resolve(cfg.resources, cluster_view(), shard)
                writer.resources_changed(resources)
            record = {"attempt": attempt, "started_at": datetime.now(UTC).isoformat(), "resources": resources.to_dict()}
            document["attempts"].append(record)
            outcome = _attempt(
                cfg, resources, writer, board, board_name, storage=storage, index_uri=index_uri,
                staging=join(staging, f"attempt-{attempt}"), stages=stages or ModelStages(),
                progress=progress, start=start, record=record, document=document, retry_failed=retry_failed,
                metrics=metrics, stop=stop, listed=listed,
            )  # fmt: skip
            if outcome == "done":
                break
            lost = ", ".join(sorted(outcome))
            progress(f"node(s) {lost} left the cluster: {len(writer.abandoned)} case(s) in flight will be redone; "
                     f"planning again on the remaining nodes (attempt {attempt + 1})")  # fmt: skip
        else:
            raise RuntimeError(f"the cluster lost nodes during each of {MAX_ATTEMPTS} attempts; giving up")
        if writer.pending:  # an invariant: every planned slice must come back
            raise RuntimeError(f"{len(writer.pending)} case(s) did not complete: {sorted(writer.pending)[:3]}")
        document["status"] = "succeeded"
        if cfg.weak.enabled and parent is None:  # a shard driver's parent submits once, for the whole job
            document["weak_jobs"] = submit_retraining(cfg, summary, progress, storage)
    except JobAborted as e:
        summary.aborted = str(e)
        document["status"] = "aborted"
        document["reason"] = str(e)
    finally:
        metrics.close(failed=document["status"] != "succeeded")
        summary.seconds = time.perf_counter() - start
        try:
            snapshot = ray.get(board.snapshot.remote(), timeout=30)
        except Exception as e:  # the record must be written whatever happened
            snapshot = {"error": f"{type(e).__name__}: {e}"}
        ray.kill(board)
        forget_stop(board_name)
        fake = [a for a in snapshot.get("actors") or () if a.get("gpu_ids") and not a.get("cuda_available")]
        if fake:
            progress(f"{len(fake)} model actor(s) were given GPU(s) by Ray but CUDA is not available on their "
                     "node(s): their models ran on CPU")  # fmt: skip
        summary.skipped_committed = int(snapshot.get("scan", {}).get("skipped_committed", 0))
        summary.redone = int(snapshot.get("scan", {}).get("redone", 0))
        summary.grown_series = int(snapshot.get("scan", {}).get("grown_series", 0))
        document.update(
            finished_at=datetime.now(UTC).isoformat(),
            wall_seconds=round(summary.seconds, 3),
            counts={
                "cases": summary.cases,
                "slices": summary.slices,
                "by_status": summary.by_status,
                "by_error": summary.by_error,
                "skipped_committed": summary.skipped_committed,
                "grown_series": summary.grown_series,
            },
            scan=snapshot.get("scan"),
            actors=snapshot.get("actors"),
            timeline={
                "scan_started_at": _iso(snapshot.get("scan_started_at")),
                "scan_finished_at": _iso(snapshot.get("scan_finished_at")),
                "first_commit_at": _iso(writer.first_commit_at),
                "stages": {k: {e: _iso(t) for e, t in v.items()} for k, v in writer.timeline().items()},
            },
            tables=writer.table_versions(),
            commits={"count": writer.seq, "replaced": summary.replaced, "dropped": summary.dropped},
            assembly_seconds=round(writer.assembly_seconds, 3),
            assembled=dict(writer.assembled),
            model_sha256={k: sorted(v) for k, v in writer.models.items()},
        )
        if document["status"] == "running":
            document["status"] = "failed"
        if document["status"] != "failed" and parent is None:  # a shard driver's parent does it, at the end
            document["seg_store"] = store_segs(catalog, cfg, run_id, progress)
            document["maintenance"] = maintain_tables(catalog, cfg, index_uri, progress)
        catalog.write_run(run_id, document)
        catalog.remove_staging(run_id)
    return summary


# Said once per job, before the model pools start: Ray prints an error-level line for them that ops would
# otherwise chase (core_worker.cc, once per driver).
RAY_ACTOR_ARGS_NOTE = (
    "note: Ray's 'E ... core_worker.cc ... has constructor arguments in the object store and max_restarts > 0' "
    "line for the model pools is expected and harmless: Ray Data hands every restartable actor its arguments by "
    "reference (ray-project/ray#53727), and this driver holds them for as long as the job runs"
)


class NodesLost(Exception):
    """Nodes that ran the attempt's work left the cluster (their actors cannot come back)."""


class JobStopped(Exception):
    """The caller set run_job's stop event."""


def _poll_board(board, writer: CaseWriter, metrics: JobMetrics) -> None:
    """The grouper's count of planned cases into the queue gauges; its cases with nothing to segment
    into the writer."""
    import ray

    planned, unsegmented = ray.get(board.poll.remote(), timeout=60)
    metrics.planned(planned)
    writer.add_unsegmented(unsegmented)


def _pools(r: Resolved) -> str:
    if r.together:
        return f"{r.models.max_actors} actor(s) with M2IB and SAM"
    return f"{r.saliency.max_actors} M2IB + {r.sam.max_actors} SAM actor(s)"


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _attempt(cfg, resources, writer, board, board_name, *, storage, index_uri, staging, stages, progress, start,
             record, document, metrics, retry_failed=False, stop=None, listed=None) -> str | set[str]:  # fmt: skip
    """One pass over the archive: "done", or the ids of the nodes lost meanwhile.

    A lost node's model actors cannot restart while the remaining GPUs are taken, and their batches
    would wait for them forever: the attempt is stopped (its actors killed, which fails the batches in
    flight), what was assembled is committed, and the job plans again on the remaining cluster.
    Committed cases are skipped by the next attempt, as by a next run. listed: the waves a shard
    driver's parent listed (each attempt of each shard cuts the same listing), or None: listed here.
    """
    waves = listed if listed is not None else list_archive(
        cfg.inputs.uris, storage=storage, include=cfg.inputs.include, exclude=cfg.inputs.exclude,
        wave_objects=cfg.inputs.wave_objects, index_uri=index_uri, staging_uri=join(staging, "waves"),
    )  # fmt: skip
    objects, cached = sum(w.objects for w in waves), sum(w.cached for w in waves)
    record["listing"] = {"objects": objects, "waves": len(waves), "indexed": cached,
                         "listed_at": datetime.now(UTC).isoformat(),
                         "listed_by": "parent" if listed is not None else "this run"}  # fmt: skip
    own, unread_after = None, False
    shard = cfg.resources.shard_spec()
    if shard is not None:  # this driver's share: contiguous waves, and the waves either side of them
        part = shard_waves(waves, *shard)
        waves, own, objects, unread_after = part.waves, part.own, part.objects, part.unread_after
        record["listing"]["shard"] = {"shard": f"{shard[0] + 1}/{shard[1]}", "objects": objects,
                                      "waves": own[1] - own[0], "read_waves": len(waves)}  # fmt: skip
    document.setdefault("listing", record["listing"])
    share = f" (shard {shard[0] + 1}/{shard[1]}: {objects} of them)" if shard is not None else ""
    progress(f"run {writer.run_id}: {record['listing']['objects']} objects in {record['listing']['waves']} "
             f"wave(s){share}, {cached} already indexed; model pools: {_pools(resources)}, "
             f"{resources.gpus:g} GPU(s)")  # fmt: skip
    if not waves:
        return "done"
    if record["attempt"] == 1:
        progress(RAY_ACTOR_ARGS_NOTE)
    nodes, since = _alive_nodes(), time.time()
    cases = cases_stream(
        waves, storage=storage, index_uri=index_uri, run_id=writer.run_id, committed_out=cfg.outputs.uri,
        targets=tuple(t.name for t in cfg.targets), board=board_name, divert_unsegmented=True,
        scan_tasks=max(1, int(resources.cluster.get("cpus", 1) // SCAN_CPU_SHARE)),
        limits=cfg.resources.size_limits(), slice_axis=cfg.slice_axis,
        max_attempts=cfg.failure_budget.transient_attempts, retry_failed=retry_failed and attempt_is_first(record),
        own=own, unread_after=unread_after,
    )  # fmt: skip
    rows = build_pipeline(cases, cfg, resources, storage=storage, staging_uri=join(staging, "parts"),
                          run_id=writer.run_id, board=board_name, stages=stages)  # fmt: skip
    if stop is not None:
        rows = stoppable(rows, stop, name=board_name)
    last_progress = last_check = last_take = time.monotonic()
    lost: set[str] = set()
    try:
        for batch in _batches(rows, POLL_SECONDS):
            if batch:
                writer.add_rows(batch)
            else:
                writer.dispatch()
            now = time.monotonic()
            if now - last_take >= POLL_SECONDS:
                last_take = now
                _poll_board(board, writer, metrics)
            if stop is not None and stop.is_set():
                raise JobStopped
            if now - last_progress >= PROGRESS_SECONDS:
                last_progress = now
                _progress_line(progress, writer, board, start, objects)
            if now - last_check >= NODE_CHECK_SECONDS:
                last_check = now
                lost = nodes - _alive_nodes()
                if lost:
                    raise NodesLost(lost)
    except NodesLost:
        _stop_attempt(board, since)
    except Exception:
        if stop is not None and stop.is_set():  # JobStopped here, or ExecutionStopped from Ray Data
            _stop_attempt(board, since)
            writer.abandon_in_flight()  # what is assembled is committed
            raise JobAborted("stopped by its caller (run_job's stop event)") from None
        if not (nodes - _alive_nodes()):
            raise
        lost = nodes - _alive_nodes()  # the attempt failed because nodes went away: plan again
        _stop_attempt(board, since)
    _poll_board(board, writer, metrics)  # what the grouper left last
    if lost:
        writer.abandon_in_flight()
        metrics.attempt_stopped()
        record["lost_nodes"] = sorted(lost)
        return lost
    writer.drain()
    document["ray_data"] = ray_data_stats(rows)
    return "done"


def attempt_is_first(record: dict) -> bool:
    """--retry-failed applies to the run's first attempt; later attempts (after lost nodes) redo what the
    first left, and the failures it committed stand."""
    return record.get("attempt") == 1


def _stop_attempt(board, since: float) -> None:
    """Kill the attempt's actors (model actors, grouper): their batches in flight fail, and Ray Data
    stops the attempt's execution."""
    import ray

    for handle in ray.get(board.handles.remote(since), timeout=30):
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat() if t else None


def _progress_line(progress, writer: CaseWriter, board, start: float, objects: int) -> None:
    """One line every PROGRESS_SECONDS: scan, cases, failures, slices, rate, and an estimate of the time
    left from the share of the archive's objects whose cases are done (or were committed before)."""
    import ray

    try:
        scan = ray.get(board.snapshot.remote(), timeout=5)["scan"]
    except Exception:
        scan = {}
    s = writer.summary
    elapsed = time.perf_counter() - start
    rate = s.slices / elapsed
    share = min(1.0, (writer.objects_done + int(scan.get("skipped_objects", 0))) / objects) if objects else 0.0
    eta = f"~{_duration(elapsed * (1 - share) / share)} left" if share > 0 else "time left unknown yet"
    progress(
        f"scanned {scan.get('objects', '?')}/{objects} object(s) ({scan.get('probed', '?')} header reads); "
        f"{s.cases} case(s) done ({writer.failed} failed), {s.slices} slice(s), {rate:.2f} slices/s; "
        f"{share:.0%} of the archive, {eta}"
    )


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
