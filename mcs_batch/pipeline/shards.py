"""Shard drivers: one job's archive coordinated by N drivers instead of one.

    parent (run_job when resources.drivers resolves to N > 1: the process `segment` runs in)
      lists the archive once (its waves under the parent's staging folder)
      N ShardDriver actors, each running run_job for shard i/N (resources.shard):
        takes its share of the parent's listing (archive/listing.shard_waves: contiguous waves with about
        the same number of objects, and the wave before and the two after them, so that a series
        crossing a cut is one case, of the shard where its first file is), streams it through its own model pools, sized
        for 1/N of the cluster (pipeline/resources.shard_view), and commits to the same catalog as
        the others (Delta: concurrent writers, each (case, target) pair once)
      every POLL_SECONDS: each shard run's metrics summed into the parent's (telemetry.JobMetrics.absorb),
        which serves them on outputs.metrics_port; a shard whose driver died is restarted as a new run
        of that shard (its grouper skips what the shard's earlier runs committed), at most
        SHARD_RESTARTS times; the dead run's record is closed and its staging removed at once
      the job's record (OUT/runs/<run>.json): the shard runs, their summed counts, the table versions

Model pools: one set per shard. Ray Data's actor pools belong to one execution, and one execution is
one driver's work: a shared pool would need a scheduler of our own between N executions and the
actors, and would move each block through one more hop. With a pool per shard, every block stays
within its shard's execution, as with one driver.

One listing for all: N drivers listing a large archive would read it N times, and a shard restarted
while new objects arrive would cut a different listing than its siblings did (objects owned twice, or
by no shard). Every run of every shard cuts the parent's listing.

`--shard i/N` (resources.shard) runs one shard as its own job instead, for sites that submit N
separate `ray job submit` runs: each lists the archive and cuts it the same way, so the N runs should
start on the same archive (what arrives between their listings may fall to none of them, and is found
by the next run: the grouper skips what is committed).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime

from mcs_batch.archive.listing import Wave, list_archive
from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.outputs.catalog import Catalog, new_run_id
from mcs_batch.outputs.lease import RunHeartbeat, end_dead_run
from mcs_batch.pipeline.finish import maintain_tables, store_segs, submit_retraining
from mcs_batch.pipeline.preflight import check_configuration, clean_up_dead_runs, package_versions
from mcs_batch.pipeline.resources import cluster_view
from mcs_batch.pipeline.writer import JobSummary
from mcs_batch.telemetry import JobMetrics

PROGRESS_SECONDS = 10.0  # the parent's line summing the shards (each shard also says its own)
POLL_SECONDS = 2.0  # how often the parent takes the shards' metrics and looks for dead drivers
SHARD_RESTARTS = 3  # a shard whose driver died is run again this many times at most
SHARD_ACTOR_PREFIX = "mcs-batch-shard-"  # + the shard run's id: the driver actor's name (ops can find it)
SUMMED = ("cases", "slices", "skipped_committed", "redone", "grown_series", "replaced", "dropped")


class ShardDriver:
    """A Ray actor running one shard's job (threaded: `metrics` and `stop` answer while `run` runs)."""

    def __init__(self) -> None:
        self._metrics: JobMetrics | None = None
        self._stop = threading.Event()

    def run(self, job, cfg: JobConfig, *, run_id: str, parent: str, storage, retry_failed: bool, stages,
            listed: list[Wave]) -> dict:  # fmt: skip
        """job: pipeline/job.run_job; listed: the parent's listing."""
        label = f"shard {cfg.resources.shard}"
        self._metrics = JobMetrics()  # served by the parent, summed with the other shards'
        cpu = time.process_time()  # this process, every thread: the driver's cost (Ray Data's executor included)
        summary = job(cfg, storage=storage, retry_failed=retry_failed, stages=stages, stop=self._stop,
                      progress=lambda line: print(f"{label}: {line}", flush=True), run_id=run_id,
                      metrics=self._metrics, parent=parent, listed=listed)  # fmt: skip
        return {"summary": asdict(summary), "driver_cpu_s": time.process_time() - cpu}

    def metrics(self) -> dict | None:
        return self._metrics.snapshot() if self._metrics is not None else None

    def stop(self) -> None:
        self._stop.set()


def shard_config(cfg: JobConfig, shard: int, shards: int) -> JobConfig:
    """Shard `shard` (0-based) of `shards`: its resources say which, and it serves no metrics (the
    parent does)."""
    return replace(cfg, resources=replace(cfg.resources, shard=f"{shard + 1}/{shards}"),
                   outputs=replace(cfg.outputs, metrics_port=0, metrics_linger_seconds=0.0))  # fmt: skip


def run_sharded(cfg: JobConfig, shards: int, *, job, storage: StorageOptions | None, retry_failed: bool, progress,
                stages=None, stop: threading.Event | None = None) -> JobSummary:  # fmt: skip
    """The job as `shards` shard drivers (see the module's docstring), each running `job` (pipeline/
    job.run_job) for its shard; the summary sums theirs."""
    start = time.perf_counter()
    run_id = new_run_id()
    catalog = Catalog(cfg.outputs.uri, storage=storage, owner=run_id)
    catalog.check_writable()
    heartbeat = RunHeartbeat(catalog, run_id)  # the parent's record is not a dead run's to a shard's sweep
    heartbeat.start()
    try:
        clean_up_dead_runs(catalog, cfg, run_id, progress)
        config_hash = check_configuration(catalog, cfg)
        metrics = JobMetrics(cfg.outputs.metrics_port, cfg.outputs.metrics_linger_seconds)
        document = {
            "run_id": run_id, "status": "running", "started_at": datetime.now(UTC).isoformat(),
            "config": cfg.to_dict(), "config_hash": config_hash, "packages": package_versions(),
            "tiny_models": cfg.models.tiny,
            "resources": {"drivers": shards, "driver_cpus": cfg.resources.driver_cpus, "cluster": cluster_view()},
            "shards": [],
        }  # fmt: skip
        catalog.write_run(run_id, document)
        index_uri = cfg.inputs.index or join(cfg.outputs.uri, "index")
        listed = list_archive(cfg.inputs.uris, storage=storage, include=cfg.inputs.include, exclude=cfg.inputs.exclude,
                              wave_objects=cfg.inputs.wave_objects, index_uri=index_uri,
                              staging_uri=join(catalog.uri("staging", run_id), "waves"))  # fmt: skip
        document["listing"] = {"objects": sum(w.objects for w in listed), "waves": len(listed),
                               "indexed": sum(w.cached for w in listed), "listed_at": datetime.now(UTC).isoformat()}
        progress(f"run {run_id}: {shards} shard drivers, each with its share of the archive "
                 f"({document['listing']['objects']} objects in {len(listed)} wave(s)) and of the cluster")
        try:
            results = _drive(cfg, shards, run_id, metrics, document, job=job, storage=storage,
                             retry_failed=retry_failed, stages=stages, stop=stop, progress=progress,
                             listed=listed)  # fmt: skip
            summary = _summed(results, run_id, cfg, config_hash)
            document["status"] = "aborted" if summary.aborted else "succeeded"
            if cfg.weak.enabled and not summary.aborted:
                document["weak_jobs"] = submit_retraining(cfg, summary, progress, storage)
            document["seg_store"] = store_segs(catalog, cfg, run_id, progress)
            document["maintenance"] = maintain_tables(catalog, cfg, index_uri, progress)
            summary.seconds = time.perf_counter() - start
            summary.run_uri = catalog.uri("runs", f"{run_id}.json")
            counts = ("cases", "slices", "by_status", "by_error", "skipped_committed", "grown_series")
            document.update(wall_seconds=round(summary.seconds, 3), counts={k: getattr(summary, k) for k in counts})
            if summary.aborted:
                document["reason"] = summary.aborted
        finally:
            metrics.close(failed=document["status"] != "succeeded")
            if document["status"] == "running":  # _drive raised: a shard failed for good
                document["status"] = "failed"
            document["finished_at"] = datetime.now(UTC).isoformat()
            document["tables"] = _tables(catalog, [r for s in document["shards"] for r in s["runs"]])
            catalog.write_run(run_id, document)
            catalog.remove_staging(run_id)
        return summary
    finally:
        heartbeat.stop()


def _drive(cfg, shards, run_id, metrics, document, *, job, storage, retry_failed, stages, stop, progress,
           listed) -> list[dict]:  # fmt: skip
    """Start the shard drivers, sum their metrics, restart the dead ones; their summaries, in shard order."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    actor = ray.remote(ShardDriver)
    catalog = Catalog(cfg.outputs.uri, storage=storage)
    running: dict = {}  # a run's ObjectRef -> (shard, its run id, the actor)
    done: dict[int, dict] = {}

    def launch(shard: int) -> None:
        entry = document["shards"][shard]
        shard_run = f"{run_id}-shard{shard + 1}of{shards}" + (f"-r{entry['restarts']}" if entry["restarts"] else "")
        entry["runs"].append(shard_run)
        handle = actor.options(name=f"{SHARD_ACTOR_PREFIX}{shard_run}", num_cpus=cfg.resources.driver_cpus,
                               max_concurrency=4, max_restarts=0).remote()  # fmt: skip
        ref = handle.run.remote(job, shard_config(cfg, shard, shards), run_id=shard_run, parent=run_id, storage=storage,
                                retry_failed=retry_failed and not entry["restarts"], stages=stages,
                                listed=listed)  # fmt: skip
        running[ref] = (shard, shard_run, handle)

    def finished(ref) -> None:
        shard, shard_run, handle = running.pop(ref)
        entry = document["shards"][shard]
        try:
            result = ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            metrics.absorb(shard_run, None, ended=True)
            end_dead_run(catalog, shard_run, reason=f"its shard driver died ({type(e).__name__})")
            if stopping or entry["restarts"] >= SHARD_RESTARTS:
                entry.update(status="failed", error=f"its driver died {entry['restarts'] + 1} time(s)")
                return
            entry["restarts"] += 1
            progress(f"shard {entry['shard']}: its driver died ({type(e).__name__}); restarting it as a new run "
                     f"({entry['restarts']} of {SHARD_RESTARTS}), which resumes from what is committed")  # fmt: skip
            launch(shard)
            return
        except Exception as e:  # the shard's job failed (a bug; the cluster lost nodes in every attempt)
            entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
            progress(f"shard {entry['shard']} failed: {entry['error'].splitlines()[0]}")
            return
        entry["status"] = "aborted" if result["summary"]["aborted"] else "succeeded"
        entry["driver_cpu_s"] = round(result["driver_cpu_s"], 3)
        done[shard] = result["summary"]
        with contextlib.suppress(Exception):
            metrics.absorb(shard_run, ray.get(handle.metrics.remote(), timeout=30))
        ray.kill(handle)

    for shard in range(shards):
        document["shards"].append({"shard": f"{shard + 1}/{shards}", "runs": [], "restarts": 0, "status": "running"})
        launch(shard)
    stopping = False
    said = time.monotonic()
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                finished(ref)
            live = list(running.values())
            with contextlib.suppress(Exception):  # the live sum; a driver that does not answer now is read next time
                snapshots = ray.get([handle.metrics.remote() for _, _, handle in live], timeout=POLL_SECONDS)
                for (_, shard_run, _), snapshot in zip(live, snapshots, strict=True):
                    if snapshot is not None:
                        metrics.absorb(shard_run, snapshot)
            if time.monotonic() - said >= PROGRESS_SECONDS:
                said = time.monotonic()
                q = metrics.queue()
                restarts = sum(s["restarts"] for s in document["shards"])
                progress(f"{len(running)} of {shards} shard driver(s) running: {q['committed']} case(s) committed "
                         f"({q['failed']} failed), {q['in_flight']} in flight, {q['planned']} planned; "
                         f"{restarts} restart(s)")  # fmt: skip
            if stop is not None and stop.is_set() and not stopping:
                stopping = True
                for _, _, handle in live:
                    handle.stop.remote()
    finally:
        for _, _, handle in running.values():  # left only when the parent itself fails
            with contextlib.suppress(Exception):
                ray.kill(handle)
    failed = [s for s in document["shards"] if s["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {shards} shard(s) failed: " +
                           "; ".join(f"shard {s['shard']}: {s.get('error', '')}" for s in failed)[:1000])  # fmt: skip
    return [done[shard] for shard in sorted(done)]


def _summed(results: list[dict], run_id: str, cfg: JobConfig, config_hash: str) -> JobSummary:
    summary = JobSummary(run_id=run_id, out=cfg.outputs.uri, config_hash=config_hash, tiny_models=cfg.models.tiny)
    for result in results:
        for key in SUMMED:
            setattr(summary, key, getattr(summary, key) + int(result[key]))
        for key in ("by_status", "by_error"):
            for name, n in result[key].items():
                getattr(summary, key)[name] = getattr(summary, key).get(name, 0) + n
        if result["aborted"] and not summary.aborted:
            summary.aborted = result["aborted"]
    return summary


def _tables(catalog: Catalog, runs: list[str]) -> dict[str, dict[str, int]]:
    """The Delta versions the shard runs' commits produced: the first of any, the last of any."""
    from mcs_batch.outputs.runs import read_run

    out: dict[str, dict[str, int]] = {}
    for run in runs:
        record = read_run(catalog, run)
        for table, versions in (record.tables if record else {}).items():
            seen = out.setdefault(table, dict(versions))
            seen["first"] = min(seen["first"], versions["first"])
            seen["last"] = max(seen["last"], versions["last"])
    return out
