"""The checkpoint ensemble's schedule (pure): a cyclic cosine learning rate, and which epochs are kept.

Epochs are 0-based over the whole run: epoch e is epoch t = e % E of cycle c = e // E (E epochs per
cycle). The learning rate falls from lr to lr * min_lr_ratio along a half cosine within each cycle and
restarts at the next; the last M epochs of each cycle end with an ensemble checkpoint.
"""

from __future__ import annotations

import math

from mcs_batch.train.weak.config import TrainSettings


def cyclic_lr(epoch: int, cfg: TrainSettings) -> float:
    t = epoch % cfg.epochs_per_cycle
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * t / cfg.epochs_per_cycle))


def is_kept(epoch: int, cfg: TrainSettings) -> bool:
    return epoch % cfg.epochs_per_cycle >= cfg.epochs_per_cycle - cfg.keep_per_cycle


def member_name(rank: int, epoch: int, cfg: TrainSettings) -> str:
    """File stem of an ensemble checkpoint: member r, cycle c, epoch e (all zero-padded: sorts by time)."""
    return f"member{rank:02d}_cycle{epoch // cfg.epochs_per_cycle:02d}_epoch{epoch:04d}"


def kept_epochs(cfg: TrainSettings) -> list[int]:
    return [e for e in range(cfg.total_epochs) if is_kept(e, cfg)]
