"""CPU stage: saliency -> coarse mask -> components -> boxes / points, per (slice, target)."""

from __future__ import annotations

import numpy as np

from mcs_batch.config import Ablation, JobConfig
from mcs_batch.rows import PromptRecord, model_rows, pack_mask, target_column
from mcs_batch.stages.coarse import ImageKey, ablation_mask, prompts_for


def prompts_batch(batch: dict, *, cfg: JobConfig) -> dict:
    """Replaces t{j}_saliency by t{j}_prompts (a PromptRecord) and, for an ablation run (no SAM),
    t{j}_premask: the ablation's mask, bit-packed (b"" otherwise)."""
    n, targets = len(batch["case_id"]), cfg.targets
    rows = model_rows(batch)
    maps = [[np.asarray(batch[target_column(j, "saliency")][i], np.float32) for j in range(len(targets))] for i in rows]
    keys = [ImageKey(str(batch["case_id"][i]), int(batch["slice_index"][i])) for i in rows]
    found = prompts_for(maps, keys, targets, seed=cfg.seed)
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
