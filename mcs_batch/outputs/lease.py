"""Which runs writing an OUT are alive: a heartbeat file per run.

    OUT/locks/run-<run_id>.json    {run_id, host, pid, started_at, heartbeat_at, released}

Several jobs (and refinements) write one OUT at once: their commits go through the Delta log
(outputs/delta.py), and no OUT-wide lease stands between them. What needs to know which runs are alive
is the clean-up that follows a crash: the staging folder of a dead run is removed and its run record
closed as failed (`sweep`, at every job's start), and vacuum keeps the masks a live run may still
commit. A run beats every `heartbeat_s` and removes its file when it ends; it is dead once its file is
gone or marked released, once its process is
gone (same host: the pid is checked), or once its heartbeat is older than `ttl_s` (another host).

A run declared dead may not be: a driver paused longer than the ttl (a suspended VM, a partitioned
node) comes back after another job swept it. Other jobs' commit windows (outputs/catalog.CommitWindow)
leave out runs that were neither alive at their start nor started since, so such a run must not commit
again: before each commit the job asks `RunHeartbeat.fenced`, which, once the run's beats have had a
gap of half the ttl, reads the run's record and says why it must stop if a sweep closed it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
from datetime import UTC, datetime

LOCKS_DIR = "locks"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _age_s(iso: str) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return 0.0  # unreadable: count it as fresh (never declare a run dead on a guess)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def alive(record: dict | None, ttl_s: float) -> bool:
    if not record or record.get("released"):
        return False
    if _age_s(record.get("heartbeat_at", "")) > ttl_s:
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return _pid_alive(record["pid"])
    return True


class RunHeartbeat:
    """This run's heartbeat file, beaten by a daemon thread from `start` to `stop`."""

    def __init__(self, catalog, run_id: str, *, heartbeat_s: float = 10.0):
        self.catalog, self.run_id, self.heartbeat_s = catalog, run_id, heartbeat_s
        self.path = catalog.path(LOCKS_DIR, f"run-{run_id}.json")
        self._document = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                          "started_at": _now(), "heartbeat_at": _now(), "released": False}  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_beat = time.time()  # wall clock: a monotonic clock stands still while a VM is suspended
        self.gap = 0.0  # the longest time between two beats since `fenced` last looked

    def start(self) -> None:
        """The first beat (raises when OUT cannot be written), then one every heartbeat_s."""
        self._write()
        self._thread = threading.Thread(target=self._beat, name="mcs-batch-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.catalog.write_bytes(self.path, json.dumps(self._document).encode(), shared_tmp=True)
        now = time.time()
        self.gap, self.last_beat = max(self.gap, now - self.last_beat), now

    def fenced(self, ttl_s: float) -> str | None:
        """Why this run must not commit any more (another job found its heartbeat stale and closed its
        record), or None. Reads the record only after a gap in the beats of half the ttl."""
        from mcs_batch.outputs.runs import read_run

        if max(self.gap, time.time() - self.last_beat) <= ttl_s / 2:
            return None
        record = read_run(self.catalog, self.run_id)
        if record is not None and record.status != "running":
            return (f"run {self.run_id} was declared dead while its driver was paused (its record says "
                    f"{record.status}: {record.document.get('reason', '')}); it stops without committing more")
        self.gap = 0.0
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._document["heartbeat_at"] = _now()
                self._write()
            except Exception:  # a storage hiccup: the next beat tries again (the ttl is many beats long)
                continue

    def stop(self) -> None:
        """The run is over: its file is removed, so OUT/locks holds the heartbeats of running jobs only
        (one the store failed to remove is marked released, and the next job's sweep removes it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.catalog.fs.rm(self.path)
        except FileNotFoundError:
            pass
        except Exception:
            with contextlib.suppress(Exception):
                self._document.update(released=True, released_at=_now())
                self._write()


def heartbeats(catalog) -> dict[str, dict]:
    """run id -> its heartbeat record, for every run file under OUT/locks."""
    try:
        paths = [p for p in catalog.fs.ls(catalog.path(LOCKS_DIR), detail=False)
                 if posixpath.basename(p).startswith("run-") and p.endswith(".json")]  # fmt: skip
    except FileNotFoundError:
        return {}
    out = {}
    # A run that ends between the listing and the read removes its file: "omit" skips it (ended
    # runs are not alive, and what they leave is swept by their own stop).
    for path, data in catalog.fs.cat(paths, on_error="omit").items() if paths else ():
        try:
            record = json.loads(data)
        except ValueError:
            record = {"heartbeat_at": _now()}  # being written: alive
        out[posixpath.basename(path)[len("run-") : -len(".json")]] = record | {"_path": path}
    return out


def live_runs(catalog, ttl_s: float) -> dict[str, dict]:
    return {run: record for run, record in heartbeats(catalog).items() if alive(record, ttl_s)}


def sweep(catalog, *, live: str, ttl_s: float) -> list[str]:
    """What dead runs left: their staging folders removed, their run records still "running" marked
    failed, their heartbeat files removed. `live` (the caller's run) is never touched. Returns what
    was done, for the job's log."""
    beats = heartbeats(catalog)
    done: list[str] = []
    for run in catalog.staging_runs():
        if run != live and not alive(beats.get(run), ttl_s):
            catalog.remove_staging(run)
            done.append(f"removed staging/{run}")
    for run in catalog.running_records():
        if run != live and not alive(beats.get(run), ttl_s):
            catalog.close_run(run, reason=f"its driver died before the end (found by run {live})")
            done.append(f"closed the record of run {run}")
    for run, record in beats.items():
        if run != live and not alive(record, ttl_s):
            with contextlib.suppress(FileNotFoundError):
                catalog.fs.rm(record["_path"])
    done += [f"removed staging/tmp/{n}" for n in catalog.remove_stale_temporaries()]
    return done


def end_dead_run(catalog, run_id: str, *, reason: str) -> None:
    """What a run known to be dead left (its process is gone: a shard driver whose actor died),
    cleaned at once instead of after its heartbeat's ttl: its record closed, its staging and heartbeat
    file removed."""
    catalog.close_run(run_id, reason=reason)
    catalog.remove_staging(run_id)
    with contextlib.suppress(FileNotFoundError):
        catalog.fs.rm(catalog.path(LOCKS_DIR, f"run-{run_id}.json"))
