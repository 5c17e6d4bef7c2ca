"""The model actors' guard: CUDA out-of-memory retried in halves, a broken CUDA context ends the actor."""

from __future__ import annotations

import pytest
import torch

from mcs_batch.stages import actors
from mcs_batch.stages.actors import ModelGuard, breaks_cuda_context, is_out_of_memory


def test_out_of_memory_halves_the_batch_until_it_fits():
    calls = []

    def model(items):
        calls.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in items]

    guard = ModelGuard("sam")
    assert guard.run(model, [1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    assert calls == [5, 2, 3, 1, 2] and guard.halvings == 2 and guard.broken is None


def test_a_slice_that_never_fits_fails_alone():
    def model(items):
        if 7 in items:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return items

    out = ModelGuard("sam").run(model, [1, 7, 3])
    assert out[0] == 1 and out[2] == 3 and isinstance(out[1], torch.cuda.OutOfMemoryError)


def test_a_broken_context_fails_the_batch_then_ends_the_actor(monkeypatch):
    def model(items):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    guard = ModelGuard("saliency")
    out = guard.run(model, [1, 2])
    assert all(isinstance(e, RuntimeError) for e in out) and guard.broken is not None
    exits = []
    monkeypatch.setattr(actors.os, "_exit", lambda code: exits.append(code))
    guard.before_call()
    assert exits == [1]  # Ray restarts the actor and retries the call on the new one


def test_other_errors_fail_the_batch_and_keep_the_actor():
    guard = ModelGuard("sam")
    out = guard.run(lambda items: 1 / 0, [1, 2])
    assert all(isinstance(e, ZeroDivisionError) for e in out) and guard.broken is None
    guard.before_call()  # no exit


@pytest.mark.parametrize(
    "error, oom, broken",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), True, False),
        (RuntimeError("CUDA out of memory. Tried to allocate"), True, False),
        (RuntimeError("CUDA error: device-side assert triggered"), False, True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), False, True),
        (RuntimeError("shape mismatch"), False, False),
    ],
)
def test_error_classes(error, oom, broken):
    assert is_out_of_memory(error) is oom and breaks_cuda_context(error) is broken
