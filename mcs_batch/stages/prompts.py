"""CPU stage: saliency -> coarse mask -> components -> boxes / points, per (slice, target)."""

from __future__ import annotations

import json

import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.outputs.masks import pack_mask
from mcs_batch.records import target_column
from mcs_batch.seeding import case_rng
from mcs_batch.stages.prompts import visual_prompts
from mcs_batch.stages.saliency import model_rows
from mcs_batch.stages.zero_shot import ablation_mask


def prompts_batch(batch: dict, *, cfg: JobConfig) -> dict:
    """Replaces t{j}_saliency by t{j}_prompts (JSON: boxes, points, reason, saliency statistics), and
    for an ablation run (no SAM) by t{j}_premask too: the ablation's mask, bit-packed."""
    n = len(batch["case_id"])
    rows = set(model_rows(batch))
    for j, target in enumerate(cfg.targets):
        column = target_column(j, "saliency")
        out, premasks = [], []
        for i in range(n):
            if i not in rows:
                out.append("")
                premasks.append(b"")
                continue
            saliency = np.asarray(batch[column][i], np.float32)
            rng = case_rng(cfg.seed, str(batch["case_id"][i]), int(batch["slice_index"][i]))
            p = visual_prompts(saliency, target.coarse, rng=rng)
            premasks.append(
                b"" if cfg.ablation == "full" else pack_mask(ablation_mask(saliency, target.coarse, cfg.ablation))
            )
            out.append(json.dumps({
                "boxes_xyxy": p.boxes_xyxy.tolist(), "points_xy": p.points_xy.tolist(),
                "reason": p.reason, "n_components": p.n_components,
                "saliency_mean": float(saliency.mean()), "saliency_max": float(saliency.max()),
            }))  # fmt: skip
        del batch[column]
        batch[target_column(j, "prompts")] = np.array(out, dtype=object)
        batch[target_column(j, "premask")] = np.array(premasks, dtype=object)
    return batch
