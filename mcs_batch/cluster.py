"""Ray plumbing: connecting to a cluster (a running one when an address is given, else a local
instance), streaming re-blocking of Ray Data datasets, and stopping a dataset's execution."""

from __future__ import annotations

import logging
import threading

# How long the local instance keeps an idle worker process above its soft limit (one per CPU; Ray's
# default is 1 s). The job's actors (models, grouper, Ray Data's helpers) keep a small node above that
# limit, so with 1 s the workers that decoded the first blocks were gone when the first parts task
# came, and it waited ~3 s for a new process started on CPUs the models held (measured: the first
# commit of the 200-image bench at 15.3-15.8 s, 11.5-12.7 s with the workers kept). A cluster started
# by `ray start` keeps Ray's default: its nodes have many more CPUs than model actors.
IDLE_WORKER_KEEP_MS = 30_000


def start_ray(
    address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int | None = None, quiet: bool = True
):
    """ray.init() once per process. The caller (the CLI) decides the address; the library never
    reads RAY_ADDRESS itself. quiet: Ray Data's own per-operator progress logs are left out (the job
    prints its own progress line); `--verbose` keeps them."""
    import ray

    if quiet:
        quiet_ray_data()
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(
            address="local",  # a new local instance: never whatever cluster another run left on this host
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
        )
    return ray


def quiet_ray_data() -> None:
    """No per-operator progress logs or bars from Ray Data in this process (the driver's)."""
    import warnings

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")  # Ray's own deprecation notice


def rechunk(ds, rows: int, *, num_cpus: float):
    """Blocks of at most `rows` rows, streamed (no barrier), fused into the map before it.

    Dataset.repartition(target_num_rows_per_block=...) does this but asks 1 CPU per task, so Ray Data
    does not fuse it with a map of fewer CPUs, and on a small node whose CPUs the model actors hold it
    never gets scheduled (a deadlock seen on 2 CPUs). This is the same logical operator with the
    upstream map's CPUs (Ray 2.60's API; tests/pipeline/test_streaming.py checks the fusion).
    """
    from ray.data import Dataset
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition

    op = StreamingRepartition(
        target_num_rows_per_block=rows,
        input_dependencies=[ds._logical_plan.dag],
        ray_remote_args={"num_cpus": num_cpus},
    )
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


STOP_KEY = "mcs_batch.stop"  # DataContext config key: the name of a dataset's stop event (`stoppable`)
_STOP_EVENTS: dict[str, threading.Event] = {}  # name -> event; the driver's process, where executors run


class ExecutionStopped(RuntimeError):
    """A stoppable dataset's stop event was set: its execution ended here."""


def stoppable(ds, stop: threading.Event, *, name: str):
    """ds, whose execution fails with ExecutionStopped at the executor's next scheduling step once
    `stop` is set: Ray Data then shuts it down (tasks cancelled, actors killed, pending ones too) and
    the consumer's iteration raises. An iteration blocked on a stage that never starts (model actors
    waiting for a GPU the cluster lacks) cannot be closed from another thread: this ends it.
    name: unique per run (the event is found by it; forget it with `forget_stop`)."""
    _STOP_EVENTS[name] = stop
    ds.context.set_config(STOP_KEY, name)
    if StopOnEvent not in ds.context.custom_execution_callback_classes:
        ds.context.custom_execution_callback_classes.append(StopOnEvent)
    return ds


def forget_stop(name: str) -> None:
    _STOP_EVENTS.pop(name, None)


class StopOnEvent:
    """A Ray Data execution callback (ray.data's ExecutionCallback interface, not subclassed so that
    importing this module imports no Ray): raises in the executor's loop once its dataset's stop event
    is set. A module-level class, so the DataContext that lists it pickles by reference. Reads the
    executor's `_data_context` (Ray Data 2.60 passes no context to callbacks)."""

    def before_execution_starts(self, executor) -> None:
        pass

    def on_execution_step(self, executor) -> None:
        context = getattr(executor, "_data_context", None)
        name = context.get_config(STOP_KEY) if context is not None else None
        event = _STOP_EVENTS.get(name) if name else None
        if event is not None and event.is_set():
            raise ExecutionStopped(f"{name}: stopped")

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error: Exception) -> None:
        pass
