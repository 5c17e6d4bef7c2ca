"""The method on a batch of 2D images for several targets (METHOD.md steps 1-6): its one implementation.

Three steps, each a function, composed by `segment_images` (what `explain` runs) and called one by one
by the job's stages (saliency, prompts, masking), so the two cannot drift apart:

    saliency_maps   M2IB per (image, target), from a CLIP prefix computed once per image
    prompts_for     coarse mask, K components, boxes, seeded points per (image, target)  (stages/coarse.py)
    sam_masks       one SAM image embedding per image, decoded per target
    (ablation rows: ablation_mask replaces SAM; stages/coarse.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mcs_batch.config import Ablation, JobConfig, TargetConfig
from mcs_batch.errors import ErrorCode
from mcs_batch.models.biomedclip import BiomedCLIP, map_to_image
from mcs_batch.models.m2ib import m2ib_from_prefix, vision_prefix
from mcs_batch.models.registry import LoadedModels
from mcs_batch.models.sam import SamSegmenter
from mcs_batch.models.visual_prompts import VisualPrompts
from mcs_batch.seeding import torch_generator
from mcs_batch.stages.coarse import ImageKey, ablation_mask, prompts_for

__all__ = ["ImageKey", "TargetResult", "ablation_mask", "prompts_for", "saliency_maps", "sam_masks", "segment_images"]


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


def saliency_maps(
    clip: BiomedCLIP,
    images: Sequence[np.ndarray],
    keys: Sequence[ImageKey],
    cfg: JobConfig,
    targets: Sequence[TargetConfig],
) -> list[list[np.ndarray]]:
    """M2IB saliency per (image, target): float32 [H, W] in [0, 1], each image's own frame.

    The CLIP blocks up to the M2IB layer run once per image; all (image, target) pairs of the batch
    are one batched M2IB problem, each with its own generator seeded by (seed, case_id, slice_index).
    """
    if len(images) != len(keys):
        raise ValueError(f"{len(images)} images but {len(keys)} keys")
    if not images or not targets:
        return [[] for _ in images]
    visual = clip.model.visual
    pixels, geometries = clip.to_clip_input(images, cfg.clip.resize)
    prefix = vision_prefix(visual, pixels, cfg.m2ib)  # [B, T, C], once per image
    texts = torch.stack([clip.encode_prompts(t.prompts) for t in targets]).to(prefix.device)  # [N, D]
    n_tgt = len(targets)
    pair_prefix = prefix.repeat_interleave(n_tgt, dim=0)  # image-major (image, target) pairs
    pair_text = texts.repeat(len(images), 1)
    device = prefix.device  # noise drawn where the model runs (see mcs_batch.seeding)
    generators = [torch_generator(cfg.seed, k.case_id, k.slice_index, device) for k in keys for _ in targets]
    maps224 = m2ib_from_prefix(visual, pair_prefix, pair_text, generators, cfg.m2ib).cpu()
    return [[map_to_image(maps224[i * n_tgt + j], geometries[i]) for j in range(n_tgt)] for i in range(len(images))]


def sam_masks(
    sam: SamSegmenter,
    images: Sequence[np.ndarray],
    prompts: Sequence[Sequence[VisualPrompts]],
    targets: Sequence[TargetConfig],
) -> list[list[tuple[np.ndarray, float]]]:
    """SAM's (mask bool [H, W], score) per (image, target); one image-encoder call for the batch,
    shared by every target. Empty prompts give an empty mask and score 0 without decoding."""
    needed = [i for i, row in enumerate(prompts) if any(p.reason is None for p in row)]
    embeddings = sam.embed([images[i] for i in needed]) if needed else None
    position = {image_index: n for n, image_index in enumerate(needed)}
    out = []
    for i, row in enumerate(prompts):
        results = []
        for target, p in zip(targets, row, strict=True):
            if p.reason is not None:
                results.append((np.zeros(images[i].shape[:2], bool), 0.0))
                continue
            r = sam.segment(
                embeddings,
                position[i],
                p.boxes_xyxy,
                p.points_xy if len(p.points_xy) else None,
                k_components=target.coarse.k_components,
            )
            results.append((r.mask, float(r.score)))
        out.append(results)
    return out


def segment_images(
    models: LoadedModels,
    images: Sequence[np.ndarray],
    keys: Sequence[ImageKey],
    cfg: JobConfig,
    targets: Sequence[TargetConfig] | None = None,
) -> list[list[TargetResult]]:
    """The whole method on a batch of RGB uint8 [H, W, 3] images (sizes may differ): results[image][target]."""
    targets = list(targets if targets is not None else cfg.targets)
    maps = saliency_maps(models.clip, images, keys, cfg, targets)
    prompts = prompts_for(maps, keys, targets, seed=cfg.seed)
    if cfg.ablation == Ablation.FULL:
        masks = sam_masks(models.sam, images, prompts, targets)
    else:  # an ablation row of the paper: no SAM
        masks = [
            [(ablation_mask(m, t.coarse, cfg.ablation), 0.0) for m, t in zip(row, targets, strict=True)] for row in maps
        ]
    return [
        [
            TargetResult(t.name, m, p, mask, score, p.reason)
            for t, m, p, (mask, score) in zip(targets, maps[i], prompts[i], masks[i], strict=True)
        ]
        for i in range(len(images))
    ]
