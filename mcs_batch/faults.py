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
