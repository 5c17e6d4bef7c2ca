"""One writer per OUT: a lease taken with a create-if-absent write, kept alive by a heartbeat.

    OUT/locks/writer-<generation>.json    {run_id, host, pid, started_at, heartbeat_at, released}

The holder is the writer of the highest generation. A job takes the lease by creating the next
generation exclusively (local disk: a hard link, which fails when the name exists; object stores: a
PUT with `If-None-Match: *`), so of two jobs starting together exactly one wins. The other waits up
to `outputs.lock_wait_seconds` and then stops with a one-line error naming the holder.

A lease is free when its holder released it, when its holder's process is gone (same host: the pid
is checked), or when its heartbeat is older than `ttl_s` (another host: a driver that stopped
beating). Whoever takes a free lease that was never released learns which run died, so that its run
record can be closed. A holder checks before every commit that no later generation exists: a driver
that was paused past its ttl and then wakes up finds it lost the lease and stops instead of
committing beside the new holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from mcs_batch.errors import ConfigError

LOCKS_DIR = "locks"


class LeaseHeld(ConfigError):
    """Another live job holds the output folder."""


class LeaseLost(RuntimeError):
    """This job's lease was taken over (its heartbeat stopped past the ttl): it must not commit."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _age_s(iso: str) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return 0.0  # unreadable: count it as fresh (never steal on a guess)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriterLease:
    """The writer lease of one output folder (`fs`, `root` as `Catalog` holds them)."""

    def __init__(self, catalog, run_id: str, *, ttl_s: float = 120.0, heartbeat_s: float = 10.0):
        self.catalog, self.run_id = catalog, run_id
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.generation: int | None = None
        self.lost = ""
        self._document: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------------------
    def _path(self, generation: int) -> str:
        return self.catalog.path(LOCKS_DIR, f"writer-{generation:08d}.json")

    def _generations(self) -> list[int]:
        try:
            names = self.catalog.fs.ls(self.catalog.path(LOCKS_DIR), detail=False)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            base = posixpath.basename(name)
            if base.startswith("writer-") and base.endswith(".json"):
                try:
                    found.append(int(base[len("writer-") : -len(".json")]))
                except ValueError:
                    continue
        return sorted(found)

    def _read(self, generation: int) -> dict | None:
        try:
            return json.loads(self.catalog.fs.cat_file(self._path(generation)))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"run_id": "?", "heartbeat_at": _now()}  # being written: treat as live

    def holder(self) -> tuple[int, dict | None]:
        """(latest generation, its record) or (-1, None) when no lease was ever taken."""
        generations = self._generations()
        if not generations:
            return -1, None
        return generations[-1], self._read(generations[-1])

    def alive(self, record: dict | None) -> bool:
        if not record or record.get("released"):
            return False
        if _age_s(record.get("heartbeat_at", "")) > self.ttl_s:
            return False
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
            return _pid_alive(record["pid"])
        return True

    # -- taking and keeping ------------------------------------------------------------------------------
    def _create(self, generation: int, data: bytes) -> bool:
        path = self._path(generation)
        if self.catalog.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # atomic, fails when the name exists: the content is complete at once
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        try:
            self.catalog.fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            return True
        except FileExistsError:
            return False

    def acquire(self, *, wait_s: float = 0.0, progress=print) -> dict | None:
        """Take the lease, waiting up to `wait_s` for a live holder. Returns the record of a previous
        holder that died without releasing it (so its run can be marked), else None.

        Raises LeaseHeld (one line, exit 2) naming the live holder when the wait runs out."""
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            generation, record = self.holder()
            if self.alive(record):
                if time.monotonic() >= deadline:
                    raise LeaseHeld(
                        f"{self.catalog.out} is being written by run {record.get('run_id')} (host "
                        f"{record.get('host')}, pid {record.get('pid')}, started {record.get('started_at')}, "
                        f"last heartbeat {_age_s(record.get('heartbeat_at', '')):.0f} s ago): one writer per "
                        "output folder; wait for it, or set outputs.lock_wait_seconds"
                    )
                if not said:
                    progress(f"waiting for run {record.get('run_id')} to release {self.catalog.out}")
                    said = True
                time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
                continue
            self._document = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                              "started_at": _now(), "heartbeat_at": _now(), "released": False}  # fmt: skip
            if not self._create(generation + 1, json.dumps(self._document).encode()):
                continue  # another job took this generation first: look again
            if self._generations()[-1] != generation + 1:  # a late create beside a newer holder
                self.catalog.fs.rm(self._path(generation + 1))
                continue
            self.generation = generation + 1
            for older in self._generations():
                if older < self.generation:
                    with contextlib.suppress(FileNotFoundError):
                        self.catalog.fs.rm(self._path(older))
            self._thread = threading.Thread(target=self._beat, name="mcs-batch-lease", daemon=True)
            self._thread.start()
            died = record if record and not record.get("released") else None
            return died

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._generations()[-1:] != [self.generation]:
                    self.lost = f"the lease of {self.catalog.out} was taken by a later writer"
                    return
                self._document["heartbeat_at"] = _now()
                self.catalog.write_bytes(self._path(self.generation), json.dumps(self._document).encode(), beside=True)
            except Exception:  # a storage hiccup: the next beat tries again (the ttl is many beats long)
                continue

    def check(self) -> None:
        """Raise LeaseLost unless this job still holds the lease (called before every commit)."""
        if self.generation is None:
            raise LeaseLost("no lease taken")
        if self.lost or self._generations()[-1:] != [self.generation]:
            raise LeaseLost(self.lost or f"the lease of {self.catalog.out} was taken by a later writer")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation is None:
            return
        try:
            if self._generations()[-1:] == [self.generation]:
                self._document.update(released=True, released_at=_now())
                self.catalog.write_bytes(self._path(self.generation), json.dumps(self._document).encode(), beside=True)
        finally:
            self.generation = None
