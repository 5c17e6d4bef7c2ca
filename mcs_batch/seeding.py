"""Per-case and per-slice randomness, derived from the job seed; identical on every machine.

Contract (so that an independent implementation can reproduce a saliency map exactly):

    slice_seed(seed, case_id, slice_index)
        = first 8 bytes, little endian, of sha256(f"{seed}/{case_id}/{slice_index}".encode("utf-8")),
          masked to 63 bits

A `torch.Generator` on the device the model runs on is seeded with that number once per image; M2IB
then draws its noise as `torch.randn((samples, tokens, width), generator=g)` once per step, steps in
order. On the CPU that is the CPU generator (the values every CPU run so far has drawn); on a GPU the
CUDA generator (Philox) seeded the same way: the draws cost no CPU time and stay reproducible per
(seed, case, slice) on that device type, but differ from the CPU stream. A CPU run and a GPU run of
one config therefore give slightly different maps; two runs on the same device type give the same.
(Drawing on the CPU for a GPU costs about 8 ms per draw here, 80 ms of CPU per image: a few CPU cores
could not feed one GPU; see bench/gpu_bench.py.)
"""

from __future__ import annotations

import hashlib

import numpy as np


def slice_seed(seed: int, case_id: str, slice_index: int) -> int:
    """A 63-bit seed for one image (slice) of one case, a pure function of its arguments."""
    digest = hashlib.sha256(f"{int(seed)}/{case_id}/{int(slice_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def case_rng(seed: int, case_id: str, slice_index: int = 0) -> np.random.Generator:
    """A numpy generator for one case / slice (e.g. sampling point prompts)."""
    return np.random.default_rng(slice_seed(seed, case_id, slice_index))


def torch_generator(seed: int, case_id: str, slice_index: int, device="cpu"):
    """A `torch.Generator` on `device` seeded with `slice_seed` (see the module docstring)."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(slice_seed(seed, case_id, slice_index))
    return g
