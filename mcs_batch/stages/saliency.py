"""Model stage: M2IB saliency per (slice, target), as a Ray Data actor that loads BiomedCLIP once."""

from __future__ import annotations

import time

import numpy as np
import torch

from mcs_batch.config import JobConfig
from mcs_batch.errors import ErrorCode
from mcs_batch.io.storage import StorageOptions
from mcs_batch.models.registry import load_clip
from mcs_batch.rows import NO_MAP, fail_rows, model_rows, target_column
from mcs_batch.stages.zero_shot import ImageKey, saliency_maps


class SaliencyStage:
    """Adds t{j}_saliency: float16 [H, W] in [0, 1] per target, in the slice's own frame."""

    def __init__(self, cfg: JobConfig, storage: StorageOptions | None = None):
        if cfg.resources.torch_threads:
            torch.set_num_threads(cfg.resources.torch_threads)
        self.cfg = cfg
        self.clip, self.record = load_clip(cfg.models, storage=storage)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["case_id"])
        maps = {j: [NO_MAP] * n for j in range(len(self.cfg.targets))}
        seconds = np.zeros(n)
        rows = model_rows(batch)
        if rows:
            start = time.perf_counter()
            try:
                images = [batch["image"][i] for i in rows]
                keys = [ImageKey(str(batch["case_id"][i]), int(batch["slice_index"][i])) for i in rows]
                per_image = saliency_maps(self.clip, images, keys, self.cfg, self.cfg.targets)
                for i, row_maps in zip(rows, per_image, strict=True):
                    for j, m in enumerate(row_maps):
                        maps[j][i] = m.astype(np.float16)
            except Exception as e:  # the batch fails, the job goes on
                fail_rows(batch, rows, ErrorCode.MODEL_ERROR, f"saliency: {type(e).__name__}: {e}")
            seconds[rows] = (time.perf_counter() - start) / len(rows)
        for j, column in maps.items():
            batch[target_column(j, "saliency")] = column
        batch["saliency_s"] = seconds
        batch["clip_sha256"] = np.array([self.record.digest] * n, dtype=object)  # provenance per row
        batch["models_tiny"] = np.full(n, self.record.tiny)
        return batch
