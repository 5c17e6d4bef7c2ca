"""The method's steps between the two models, torch-free (METHOD.md steps 4-5, and the ablation rows).

    prompts_for    saliency maps -> coarse mask, K components, boxes, seeded points, per (image, target)
    ablation_mask  the mask of an ablation row (saliency / postprocess / components) instead of SAM's

Part of the method's one implementation (stages/zero_shot.py composes it with the models); here so
that the prompts stage's CPU tasks do not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mcs_batch.config import Ablation, TargetConfig
from mcs_batch.models.visual_prompts import (
    PromptSettings,
    VisualPrompts,
    coarse_mask,
    largest_components,
    visual_prompts,
)
from mcs_batch.seeding import case_rng


@dataclass(frozen=True)
class ImageKey:
    """Which image this is: the seed of everything random about it."""

    case_id: str
    slice_index: int


def prompts_for(
    maps: Sequence[Sequence[np.ndarray]], keys: Sequence[ImageKey], targets: Sequence[TargetConfig], *, seed: int
) -> list[list[VisualPrompts]]:
    """Visual prompts per (image, target) from saliency maps[image][target]; points drawn from a
    generator seeded by (seed, case_id, slice_index), the same for every target of an image."""
    return [
        [
            visual_prompts(np.asarray(m, np.float32), t.coarse, rng=case_rng(seed, k.case_id, k.slice_index))
            for m, t in zip(row, targets, strict=True)
        ]
        for row, k in zip(maps, keys, strict=True)
    ]


def ablation_mask(saliency: np.ndarray, coarse: PromptSettings, ablation: Ablation | str) -> np.ndarray:
    """The mask of an ablation row (config `ablation`), bool [H, W]; "full" is SAM's, not made here.

    saliency: map > coarse.threshold; postprocess: the coarse mask (k-means / Otsu / threshold);
    components: the K largest connected components of the coarse mask.
    """
    if ablation == "saliency":
        return saliency > coarse.threshold
    if saliency.max() <= saliency.min():
        return np.zeros(saliency.shape, bool)
    mask = coarse_mask(saliency, method=coarse.method, threshold=coarse.threshold)
    if ablation == "postprocess":
        return mask
    if ablation == "components":
        return largest_components(mask, coarse.k_components)
    raise ValueError(f"ablation {ablation!r} has no mask of its own")
