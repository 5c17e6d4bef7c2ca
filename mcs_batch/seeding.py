"""Per-case and per-slice randomness, derived from the job seed; identical on every machine.

Contract (so that an independent implementation can reproduce a saliency map exactly):

    slice_seed(seed, case_id, slice_index)
        = first 8 bytes, little endian, of sha256(f"{seed}/{case_id}/{slice_index}".encode("utf-8")),
          masked to 63 bits

A `torch.Generator` (CPU) is seeded with that number once per image; M2IB then draws its noise as
`torch.randn((samples, tokens, width), generator=g)` once per step, steps in order.
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


def torch_generator(seed: int, case_id: str, slice_index: int):
    """A CPU `torch.Generator` seeded with `slice_seed` (see the module docstring)."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(slice_seed(seed, case_id, slice_index))
    return g
