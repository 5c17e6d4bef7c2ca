"""What every model actor (saliency, masking) shares: its record, and the guard around its model calls.

- `actor_record`: who this actor is (stage, node, pid, the GPU ids Ray assigned it, where its model
  runs), reported to the job's board (mcs_batch.archive.board) and kept in the run record.
- `ModelGuard`: a CUDA out-of-memory error retries the batch in halves before failing a single slice;
  any other error retries the batch's slices one by one, so that only the slice that raises fails
  (not the other cases of its batch); an error that leaves the CUDA context unusable fails the batch
  at hand, and the actor exits at the start of its next call, so that Ray restarts it (max_restarts)
  and retries that call on a fresh process instead of failing every later batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mcs_batch.errors import ErrorCode

log = logging.getLogger(__name__)

_BROKEN_CONTEXT = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access")


def actor_record(stage: str, device: torch.device | str) -> dict:
    """This actor, as the run record lists it. On a node whose GPUs Ray knows but CUDA cannot see
    (fake GPU resources, a broken driver) the model runs on the CPU, and the record says so."""
    import ray

    context = ray.get_runtime_context()
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    record = {
        "stage": stage,
        "node": context.get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": gpu_ids,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if gpu_ids and not torch.cuda.is_available():
        log.info(
            "%s actor was assigned GPU(s) %s but CUDA is not available here: its model runs on CPU", stage, gpu_ids
        )  # fmt: skip (the driver says it once for the whole job)
    return record


def announce(board: str | None, record: dict) -> None:
    """Register with the job's board (fire and forget); no board (a stage used outside a job) is fine."""
    if not board:
        return
    import ray

    try:
        ray.get_actor(board).register_actor.remote(record, ray.get_runtime_context().current_actor)
    except ValueError:
        log.warning("job board %s not found: this actor is not recorded", board)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)
    )


def error_code(error: BaseException) -> ErrorCode:
    """The catalog's code for a slice a model could not process: out of memory (even alone in its
    batch) is transient, retried by later runs; anything else is the case's."""
    return ErrorCode.OUT_OF_MEMORY if is_out_of_memory(error) else ErrorCode.MODEL_ERROR


def breaks_cuda_context(error: BaseException) -> bool:
    return (
        isinstance(error, RuntimeError)
        and not is_out_of_memory(error)
        and any(marker in str(error) for marker in _BROKEN_CONTEXT)
    )


class ModelGuard:
    """Runs `fn(items) -> results` (one result per item) with the two recoveries above."""

    def __init__(self, stage: str):
        self.stage = stage
        self.broken: BaseException | None = None
        self.halvings = 0

    def before_call(self) -> None:
        """At the start of each call: an actor whose CUDA context broke exits, Ray restarts it."""
        if self.broken is not None:
            log.error("%s actor: CUDA context unusable since %r; exiting so that Ray restarts it",
                      self.stage, self.broken)  # fmt: skip
            os._exit(1)

    def run(self, fn: Callable[[Sequence[Any]], list], items: Sequence[Any]) -> list:
        """fn's results, or the exception in place of each item it could not process."""
        try:
            return list(fn(items))
        except Exception as e:
            if is_out_of_memory(e):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(items) > 1:
                    self.halvings += 1
                    half = len(items) // 2
                    return self.run(fn, items[:half]) + self.run(fn, items[half:])
            elif breaks_cuda_context(e):
                self.broken = e
            elif len(items) > 1:  # which slice was it? each alone: the others go on
                return [self.run(fn, [item])[0] for item in items]
            return [e] * len(items)
