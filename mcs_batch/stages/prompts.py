"""CPU stage: saliency -> coarse mask -> components -> boxes / points, per (slice, target)."""

from __future__ import annotations

import numpy as np

from mcs_batch.config import Ablation, JobConfig
from mcs_batch.errors import ErrorCode
from mcs_batch.rows import PromptRecord, fail_rows, model_rows, pack_mask, target_column
from mcs_batch.stages.coarse import ImageKey, ablation_mask, prompts_for


def _prompts_isolated(maps: list, keys: list, cfg: JobConfig) -> list:
    """prompts_for on the batch; if it raises, on each slice alone: a slice whose map no prompt can be
    made of gets the exception in its place, the other slices their prompts."""
    try:
        return prompts_for(maps, keys, cfg.targets, seed=cfg.seed)
    except Exception:
        out = []
        for row_maps, key in zip(maps, keys, strict=True):
            try:
                out.extend(prompts_for([row_maps], [key], cfg.targets, seed=cfg.seed))
            except Exception as e:
                out.append(e)
        return out


def prompts_batch(batch: dict, *, cfg: JobConfig) -> dict:
    """Replaces t{j}_saliency by t{j}_prompts (a PromptRecord) and, for an ablation run (no SAM),
    t{j}_premask: the ablation's mask, bit-packed (b"" otherwise). A slice whose prompts cannot be made
    fails (model_error), not its batch."""
    n, targets = len(batch["case_id"]), cfg.targets
    rows = model_rows(batch)
    maps = [[np.asarray(batch[target_column(j, "saliency")][i], np.float32) for j in range(len(targets))] for i in rows]
    keys = [ImageKey(str(batch["case_id"][i]), int(batch["slice_index"][i])) for i in rows]
    found = _prompts_isolated(maps, keys, cfg)
    for i, result in zip(rows, found, strict=True):
        if isinstance(result, BaseException):
            fail_rows(batch, [i], ErrorCode.MODEL_ERROR, f"prompts: {type(result).__name__}: {result}"[:300])
    kept = [(i, m, p) for i, m, p in zip(rows, maps, found, strict=True) if not isinstance(p, BaseException)]
    rows, maps, found = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
    for j, target in enumerate(targets):
        encoded, premasks = [""] * n, [b""] * n
        for i, row_maps, row_prompts in zip(rows, maps, found, strict=True):
            saliency, p = row_maps[j], row_prompts[j]
            encoded[i] = PromptRecord(
                boxes_xyxy=p.boxes_xyxy.tolist(),
                points_xy=p.points_xy.tolist(),
                reason=p.reason,
                n_components=p.n_components,
                saliency_mean=float(saliency.mean()),
                saliency_max=float(saliency.max()),
            ).encode()
            if cfg.ablation != Ablation.FULL:
                premasks[i] = pack_mask(ablation_mask(saliency, target.coarse, cfg.ablation))
        del batch[target_column(j, "saliency")]
        batch[target_column(j, "prompts")] = np.array(encoded, dtype=object)
        batch[target_column(j, "premask")] = np.array(premasks, dtype=object)
    return batch
