"""Fault injection for tests: the `testing` section of every config (all off by default).

Tests crash a driver, an actor or a training worker at a chosen moment to prove that nothing is lost
or duplicated. A fault with a `fault_marker` file fires once: the first process to create the marker
fires, later ones (the restarted actor, the resumed run) do not. Never part of a config hash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TestingConfig:
    """Where to inject a fault; 0 / "" = never."""

    __test__ = False  # not a pytest test class, whatever its name

    kill_sam_actor_after_batches: int = 0  # job: a SAM actor exits hard once, after this many batches
    exit_driver_after_commits: int = 0  # job: the driver exits hard (no clean-up) after this many commits
    interrupt_after_step: int = 0  # fine-tuning: rank 0 raises once right after this step's checkpoint
    fault_marker: str = ""  # file recording that the fault fired (so that it fires once)
    # job: the driver exits hard at this point of a commit (outputs/catalog.py), during the commit number
    # `crash_at_commit` (1 = the first): slices_committed (the slices appended, the cases not merged),
    # cases_committed; or of the end-of-job upkeep (outputs/maintenance.py): during_compaction,
    # during_vacuum; or an assembly task exits hard with a mask half written: mask_half_written (once,
    # with fault_marker)
    crash_point: str = ""
    crash_at_commit: int = 1
    # job: loading the case whose first source key is this fails as storage does (unreadable, a
    # transient code); once with fault_marker, else on every run
    unreadable_key: str = ""
    # job: decoding the case whose first source key is this aborts the worker process (SIGABRT, as a
    # native decoder's uncaught C++ exception does), on every attempt: a poison pill for the load stage
    crash_decoding_key: str = ""


CRASH_POINTS = frozenset(
    {"slices_committed", "cases_committed", "during_compaction", "during_vacuum", "mask_half_written"}
)
UPKEEP_POINTS = frozenset({"during_compaction", "during_vacuum"})  # not tied to a commit


def crash_hook(testing: TestingConfig, commits_done):
    """The driver's hook for `Catalog.crash_hook`: exits hard (like SIGKILL: no clean-up) at the
    configured point of the configured commit. `commits_done()` counts this run's commits so far."""
    if testing.crash_point not in CRASH_POINTS:
        if testing.crash_point:
            raise ValueError(f"testing.crash_point: unknown point {testing.crash_point!r}")
        return None

    def hook(point: str) -> None:
        at_commit = point in UPKEEP_POINTS or commits_done() + 1 == testing.crash_at_commit
        if point == testing.crash_point and at_commit:
            os._exit(137)

    return hook


def worker_crash_hook(testing: TestingConfig):
    """An assembly task's hook: exits hard once (fault_marker) at mask_half_written."""
    if testing.crash_point != "mask_half_written":
        return None

    def hook(point: str) -> None:
        if point == "mask_half_written" and fire_once(testing.fault_marker):
            os._exit(137)

    return hook


def fire_once(marker: str) -> bool:
    """True the first time it is called for `marker` (a file path) across processes, False after.
    An empty marker fires every time."""
    if not marker:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def decoder_crash(testing: TestingConfig, keys: list[str]) -> None:
    """Abort this process where a decode of an object with these keys must crash (crash_decoding_key)."""
    if testing.crash_decoding_key and testing.crash_decoding_key in keys[:1]:
        os.abort()


def storage_fault(testing: TestingConfig, keys: list[str]) -> bool:
    """True where a load of an object with these keys must fail as storage does (unreadable_key)."""
    return bool(testing.unreadable_key) and testing.unreadable_key in keys[:1] and fire_once(testing.fault_marker)
