"""Model stage: SAM masks from the visual prompts, as a Ray Data actor that loads SAM once."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mcs_batch.config import Ablation, JobConfig
from mcs_batch.faults import fire_once
from mcs_batch.io.storage import StorageOptions
from mcs_batch.models.registry import load_sam_segmenter
from mcs_batch.models.visual_prompts import VisualPrompts
from mcs_batch.rows import PromptRecord, fail_rows, model_rows, pack_mask, target_column, unpack_mask
from mcs_batch.stages.actors import ModelGuard, actor_record, announce, error_code
from mcs_batch.stages.zero_shot import sam_masks


def _visual_prompts(text: str) -> VisualPrompts:
    """The prompts SAM needs (boxes, points, reason) from a row's PromptRecord."""
    p = PromptRecord.decode(text)
    return VisualPrompts(np.zeros((0, 0), bool), p.boxes(), p.points(), p.n_components, p.reason)


class SamStage:
    """Adds t{j}_mask (bit-packed bool [H, W]), t{j}_score, t{j}_pixels, and the slice's height /
    width; drops the image (nothing downstream needs the pixels).

    threads: torch threads of this actor (0: torch's default); board: the job board to register with.
    """

    def __init__(self, cfg: JobConfig, storage: StorageOptions | None = None, *, threads: int = 0, board=None):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.sam, self.record = load_sam_segmenter(cfg.models, storage=storage)
        self.batches = 0
        self.guard = ModelGuard("sam")
        announce(board, actor_record("sam", self.sam.device))

    def _maybe_fail_for_tests(self) -> None:
        """Test-only fault hook (config `testing`): exit hard once, as a crashed GPU worker would."""
        t = self.cfg.testing
        due = t.kill_sam_actor_after_batches and self.batches >= t.kill_sam_actor_after_batches
        if due and t.fault_marker and fire_once(t.fault_marker):
            os._exit(1)

    def _masks(self, items: list[tuple[np.ndarray, list[VisualPrompts]]]) -> list[list[tuple[np.ndarray, float]]]:
        return sam_masks(self.sam, [image for image, _ in items], [p for _, p in items], self.cfg.targets)

    def __call__(self, batch: dict) -> dict:
        self.guard.before_call()
        self.batches += 1
        self._maybe_fail_for_tests()
        n, targets = len(batch["case_id"]), self.cfg.targets
        masks = {j: [b""] * n for j in range(len(targets))}
        scores = {j: np.zeros(n) for j in range(len(targets))}
        pixels = {j: np.zeros(n, np.int64) for j in range(len(targets))}
        heights, widths, seconds = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
        rows = model_rows(batch)
        if rows:
            start = time.perf_counter()
            images = [batch["image"][i] for i in rows]
            if self.cfg.ablation == Ablation.FULL:
                items = [
                    (image, [_visual_prompts(batch[target_column(j, "prompts")][i]) for j in range(len(targets))])
                    for i, image in zip(rows, images, strict=True)
                ]
                results = self.guard.run(self._masks, items)
            else:  # an ablation row: the mask made from the saliency map, no SAM
                results = [
                    [
                        (unpack_mask(batch[target_column(j, "premask")][i], image.shape[:2]), 0.0)
                        for j in range(len(targets))
                    ]
                    for i, image in zip(rows, images, strict=True)
                ]
            failed: dict[int, BaseException] = {}
            for i, image, row in zip(rows, images, results, strict=True):
                if isinstance(row, BaseException):
                    failed[i] = row
                    continue
                heights[i], widths[i] = image.shape[:2]
                for j, (mask, score) in enumerate(row):
                    masks[j][i], scores[j][i], pixels[j][i] = pack_mask(mask), score, int(mask.sum())
            for error in {type(e): e for e in failed.values()}.values():
                fail_rows(batch, [i for i, e in failed.items() if type(e) is type(error)], error_code(error),
                          f"sam: {type(error).__name__}: {error}")  # fmt: skip
            seconds[rows] = (time.perf_counter() - start) / len(rows)
        del batch["image"]
        for j in range(len(targets)):
            batch.pop(target_column(j, "premask"), None)
            batch[target_column(j, "mask")] = np.array(masks[j], dtype=object)
            batch[target_column(j, "score")] = scores[j]
            batch[target_column(j, "pixels")] = pixels[j]
        batch["height"], batch["width"], batch["sam_s"] = heights, widths, seconds
        batch["sam_at"] = np.full(n, time.time())
        batch["sam_sha256"] = np.array([self.record.digest] * n, dtype=object)
        batch["models_tiny"] = np.asarray(batch["models_tiny"], bool) | self.record.tiny
        return batch
