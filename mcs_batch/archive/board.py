"""JobBoard: a small named actor that the job's parts report to, and the driver reads.

The grouper reports scan progress (objects probed, headers reused from the index, cases released, when
the scan finished); every model actor registers itself (stage, node, pid, the GPU ids Ray assigned it,
the device its model runs on). The driver polls it for its progress line and writes it into the run
record. It holds counters and one small record per actor: nothing that grows with the archive.

It also passes the grouper's cases that have nothing to segment (skipped, failed at the scan) straight
to the driver, which takes them every POLL_SECONDS: they never queue behind images for the model actors;
with them, how many cases the grouper has planned (the driver's queue gauges, telemetry.py), so that a
job whose model actors never start still shows its cases in flight.
"""

from __future__ import annotations

import time


class JobBoard:
    def __init__(self) -> None:
        self.scan = {"objects": 0, "probed": 0, "cached": 0, "cases": 0, "skipped_committed": 0, "grown_series": 0,
                     "skipped_objects": 0}  # fmt: skip
        self.scan_started_at = time.time()
        self.scan_finished_at: float | None = None
        self.actors: dict[str, dict] = {}
        self._handles: list[tuple[float, object]] = []  # (registered_at, actor handle)
        self._unsegmented: list[str] = []  # case rows' case_json of cases with nothing to segment

    def add_unsegmented(self, case_jsons: list[str]) -> None:
        self._unsegmented.extend(case_jsons)

    def poll(self) -> tuple[int, list[str]]:
        """The driver's poll: the cases the grouper has planned so far (scan_progress's `cases`, which
        the grouper reports before it hands any of them on), and the case_json of the cases with
        nothing to segment it left since the last call (bounded by the driver's pace)."""
        taken, self._unsegmented = self._unsegmented, []
        return self.scan["cases"], taken

    def scan_progress(self, delta: dict) -> None:
        for key in self.scan:
            self.scan[key] += int(delta.get(key, 0))
        if delta.get("scan_finished_at") and self.scan_finished_at is None:
            self.scan_finished_at = float(delta["scan_finished_at"])

    def register_actor(self, info: dict, handle=None) -> None:
        now = time.time()
        key = f"{info.get('stage')}:{info.get('node')}:{info.get('pid')}"
        self.actors[key] = {**info, "registered_at": now}
        if handle is not None:
            self._handles.append((now, handle))

    def handles(self, since: float) -> list:
        """Handles of the actors registered since `since` (to stop an attempt)."""
        return [h for t, h in self._handles if t >= since]

    def snapshot(self) -> dict:
        return {
            "scan": dict(self.scan),
            "scan_started_at": self.scan_started_at,
            "scan_finished_at": self.scan_finished_at,
            "actors": sorted(self.actors.values(), key=lambda a: (a.get("stage", ""), a.get("registered_at", 0))),
        }


def start_board(name: str):
    """The board of one job, on the driver's node (it dies with the job)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(JobBoard).options(name=name, scheduling_strategy=strategy).remote()
