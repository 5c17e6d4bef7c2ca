"""Model stage: M2IB saliency and then the visual prompts per (slice, target), as a Ray Data actor that
loads BiomedCLIP once. The maps never leave the actor: prompts are made from the float32 maps, exactly
as `explain` makes them (one implementation: stages/zero_shot.py, stages/coarse.py)."""

from __future__ import annotations

import time

import numpy as np
import torch

from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions
from mcs_batch.models.registry import load_clip
from mcs_batch.rows import NO_MAP, fail_rows, model_rows, target_column
from mcs_batch.stages.actors import ModelGuard, actor_record, announce, error_code
from mcs_batch.stages.prompts import prompts_batch
from mcs_batch.stages.zero_shot import ImageKey, saliency_maps


class SaliencyStage:
    """Adds t{j}_prompts (a PromptRecord) and t{j}_premask (ablation runs) per target, via the maps
    t{j}_saliency (float32 [H, W] in [0, 1], the slice's own frame) that stages/prompts.py consumes.

    threads: torch threads of this actor (0: torch's default); board: the job board to register with.
    """

    def __init__(self, cfg: JobConfig, storage: StorageOptions | None = None, *, threads: int = 0, board=None):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.clip, self.record = load_clip(cfg.models, storage=storage)
        self.guard = ModelGuard("saliency")
        announce(board, actor_record("saliency", self.clip.device))

    def _maps(self, items: list[tuple[np.ndarray, ImageKey]]) -> list[list[np.ndarray]]:
        images, keys = [i for i, _ in items], [k for _, k in items]
        return saliency_maps(self.clip, images, keys, self.cfg, self.cfg.targets)

    def __call__(self, batch: dict) -> dict:
        self.guard.before_call()
        n = len(batch["case_id"])
        maps = {j: [NO_MAP] * n for j in range(len(self.cfg.targets))}
        seconds = np.zeros(n)
        rows = model_rows(batch)
        if rows:
            start = time.perf_counter()
            items = [
                (batch["image"][i], ImageKey(str(batch["case_id"][i]), int(batch["slice_index"][i]))) for i in rows
            ]
            failed: dict[int, BaseException] = {}
            for i, result in zip(rows, self.guard.run(self._maps, items), strict=True):
                if isinstance(result, BaseException):  # this slice fails, the job goes on
                    failed[i] = result
                    continue
                for j, m in enumerate(result):
                    maps[j][i] = m
            for error in {type(e): e for e in failed.values()}.values():
                fail_rows(batch, [i for i, e in failed.items() if type(e) is type(error)], error_code(error),
                          f"saliency: {type(error).__name__}: {error}")  # fmt: skip
            seconds[rows] = (time.perf_counter() - start) / len(rows)
        for j, column in maps.items():
            batch[target_column(j, "saliency")] = column
        batch["saliency_s"] = seconds
        batch["saliency_at"] = np.full(n, time.time())
        batch["clip_sha256"] = np.array([self.record.digest] * n, dtype=object)  # provenance per row
        batch["models_tiny"] = np.full(n, self.record.tiny)
        return prompts_batch(batch, cfg=self.cfg)
