"""CPU stage: saliency -> coarse mask -> components -> boxes / points, per (slice, target)."""

from __future__ import annotations

import json

import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.records import target_column
from mcs_batch.seeding import case_rng
from mcs_batch.stages.prompts import visual_prompts
from mcs_batch.stages.saliency import model_rows


def prompts_batch(batch: dict, *, cfg: JobConfig) -> dict:
    """Replaces t{j}_saliency by t{j}_prompts (JSON: boxes, points, reason, saliency statistics)."""
    n = len(batch["case_id"])
    rows = set(model_rows(batch))
    for j, target in enumerate(cfg.targets):
        column = target_column(j, "saliency")
        out = []
        for i in range(n):
            if i not in rows:
                out.append("")
                continue
            saliency = np.asarray(batch[column][i], np.float32)
            rng = case_rng(cfg.seed, str(batch["case_id"][i]), int(batch["slice_index"][i]))
            p = visual_prompts(saliency, target.coarse, rng=rng)
            out.append(json.dumps({
                "boxes_xyxy": p.boxes_xyxy.tolist(), "points_xy": p.points_xy.tolist(),
                "reason": p.reason, "n_components": p.n_components,
                "saliency_mean": float(saliency.mean()), "saliency_max": float(saliency.max()),
            }))  # fmt: skip
        del batch[column]
        batch[target_column(j, "prompts")] = np.array(out, dtype=object)
    return batch
