"""Zero-shot segmentation of a batch of 2D images for several targets (METHOD.md steps 1-6).

Per image, the work that does not depend on the target is done once: the CLIP blocks up to the M2IB
layer and the SAM image embedding. Per (image, target): M2IB from the shared prefix (all pairs of the
batch in one batched M2IB problem), the map back into the image frame, visual prompts, SAM decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mcs_batch.config import JobConfig, TargetConfig
from mcs_batch.errors import ErrorCode
from mcs_batch.models.biomedclip import map_to_image
from mcs_batch.models.m2ib import m2ib_from_prefix, vision_prefix
from mcs_batch.models.registry import LoadedModels
from mcs_batch.seeding import case_rng, torch_generator
from mcs_batch.stages.prompts import VisualPrompts, visual_prompts


@dataclass(frozen=True)
class ImageKey:
    """Which image this is: the seed of everything random about it."""

    case_id: str
    slice_index: int


@dataclass
class TargetResult:
    """One target on one image, all in the image's own pixel frame.

    saliency: float32 [H, W] in [0, 1]; prompts: coarse mask, boxes, points;
    mask: bool [H, W] (empty when reason is set); sam_score: SAM's predicted IoU (0 when empty).
    """

    target: str
    saliency: np.ndarray
    prompts: VisualPrompts
    mask: np.ndarray
    sam_score: float
    reason: ErrorCode | None = None


def segment_images(
    models: LoadedModels,
    images: Sequence[np.ndarray],
    keys: Sequence[ImageKey],
    cfg: JobConfig,
    targets: Sequence[TargetConfig] | None = None,
) -> list[list[TargetResult]]:
    """images: RGB uint8 [H, W, 3] (sizes may differ). Returns results[image][target]."""
    targets = list(targets if targets is not None else cfg.targets)
    if len(images) != len(keys):
        raise ValueError(f"{len(images)} images but {len(keys)} keys")
    if not images or not targets:
        return [[] for _ in images]
    clip = models.clip
    visual = clip.model.visual
    pixels, geometries = clip.to_clip_input(images, cfg.clip.resize)
    prefix = vision_prefix(visual, pixels, cfg.m2ib)  # [B, T, C], once per image
    texts = torch.stack([clip.encode_prompts(t.prompts) for t in targets]).to(prefix.device)  # [N, D]

    # every (image, target) pair is one M2IB problem; image-major order
    n_img, n_tgt = len(images), len(targets)
    pair_prefix = prefix.repeat_interleave(n_tgt, dim=0)
    pair_text = texts.repeat(n_img, 1)
    generators = [torch_generator(cfg.seed, k.case_id, k.slice_index) for k in keys for _ in targets]
    saliency224 = m2ib_from_prefix(visual, pair_prefix, pair_text, generators, cfg.m2ib).cpu()

    sam_embeddings = models.sam.embed(images)  # one encoder call for the batch, shared by all targets
    results: list[list[TargetResult]] = []
    for i, key in enumerate(keys):
        row = []
        for j, target in enumerate(targets):
            saliency = map_to_image(saliency224[i * n_tgt + j], geometries[i])
            prompts = visual_prompts(saliency, target.coarse, rng=case_rng(cfg.seed, key.case_id, key.slice_index))
            if prompts.reason is not None:
                empty = np.zeros(saliency.shape, bool)
                row.append(TargetResult(target.name, saliency, prompts, empty, 0.0, prompts.reason))
                continue
            sam = models.sam.segment(
                sam_embeddings,
                i,
                prompts.boxes_xyxy,
                prompts.points_xy if len(prompts.points_xy) else None,
                k_components=target.coarse.k_components,
            )
            row.append(TargetResult(target.name, saliency, prompts, sam.mask, float(sam.score)))
        results.append(row)
    return results
