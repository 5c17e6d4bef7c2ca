"""`explain`: run the method on a few 2D images or chosen slices and write everything it sees.

    OUT/explain.json                                     config, its hash, model digests, per-image results
    OUT/<case_id>/k<slice>/image.png                     the model input (windowed RGB)
    OUT/<case_id>/k<slice>/<target>/saliency.npy         float32 [H, W] in [0, 1], image frame
    OUT/<case_id>/k<slice>/<target>/coarse_mask.png      the coarse mask (K largest components)
    OUT/<case_id>/k<slice>/<target>/boxes.json           SAM prompts: boxes XYXY, points XY
    OUT/<case_id>/k<slice>/<target>/mask.png             SAM's mask
    OUT/<case_id>/k<slice>/<target>/overlay.png          image + mask contour + boxes | saliency heat map

Paths are built from case ids and target names only, never from DICOM tag text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError
from mcs_batch.io.display import slice_count
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.models.registry import LoadedModels
from mcs_batch.outputs.qc import overlay
from mcs_batch.records import CaseRecord, Status
from mcs_batch.scan import discover_cases
from mcs_batch.stages.load import load_chunk
from mcs_batch.stages.zero_shot import ImageKey, TargetResult, segment_images

BATCH = 4  # images per model call


def _slices_for(record: CaseRecord, wanted: Sequence[int] | None, axis: int) -> list[int]:
    n = slice_count(record, axis)
    if not wanted or n == 1:  # 2D images have one slice, whatever was asked for volumes
        return [n // 2]
    bad = [k for k in wanted if not 0 <= k < n]
    if bad:
        raise CaseError(f"case {record.case_id}: slice {bad[0]} outside 0..{n - 1}", code="unsupported_dimensions")
    return list(wanted)


def _write_target(folder: Path, image: np.ndarray, result: TargetResult, *, tiny: bool, title: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "saliency.npy", result.saliency.astype(np.float32))
    Image.fromarray(result.prompts.coarse_mask.astype(np.uint8) * 255).save(folder / "coarse_mask.png")
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(folder / "mask.png")
    prompts = {
        "boxes_xyxy": result.prompts.boxes_xyxy.tolist(),
        "points_xy": result.prompts.points_xy.tolist(),
        "frame": "image pixels (x = column, y = row)",
    }
    (folder / "boxes.json").write_text(json.dumps(prompts, indent=2))
    picture = overlay(image, result.saliency, result.prompts.boxes_xyxy, result.mask, title=title, tiny=tiny)
    Image.fromarray(picture).save(folder / "overlay.png")
    return {
        "target": result.target,
        "boxes": len(result.prompts.boxes_xyxy),
        "mask_pixels": int(result.mask.sum()),
        "sam_score": round(result.sam_score, 6),
        "reason": result.reason,
        "folder": str(folder),
    }


def explain(
    inputs: Sequence[str],
    out: Path,
    cfg: JobConfig,
    models: LoadedModels,
    *,
    storage: StorageOptions | None = None,
    slices: Sequence[int] | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Run the zero-shot method on the inputs' images / slices and write the files above."""
    start = time.perf_counter()
    records = discover_cases(inputs, storage=storage)
    fs = filesystem_for(inputs[0], storage)[0] if inputs else None
    progress(f"{len(records)} case(s) found; {'TINY random models: masks are meaningless' if models.tiny else ''}")
    items: list[dict] = []
    queue: list[tuple[dict, np.ndarray, ImageKey]] = []

    def flush():
        if not queue:
            return
        images = [image for _, image, _ in queue]
        results = segment_images(models, images, [key for _, _, key in queue], cfg)
        for (item, image, key), per_target in zip(queue, results, strict=True):
            folder = out / key.case_id / f"k{key.slice_index}"
            Image.fromarray(image).save(folder / "image.png")
            title = f"{key.case_id} k={key.slice_index}"
            item["targets"] = [
                _write_target(folder / r.target, image, r, tiny=models.tiny, title=f"{title} {r.target}")
                for r in per_target
            ]
        progress(f"explained {sum(1 for i in items if 'targets' in i)} image(s)")
        queue.clear()

    for record in records:
        base = {"case_id": record.case_id, "kind": record.kind, "source_keys": record.source_keys}
        if record.status != Status.OK:
            items.append({**base, "status": record.status, "error_code": record.error_code})
            continue
        try:
            for k in _slices_for(record, slices, cfg.slice_axis):
                (image,) = load_chunk(record, k, k + 1, cfg, fs=fs)  # the job's reader: same plane, same window
                item = {**base, "status": "ok", "slice_index": k, "image_size_hw": list(image.shape[:2])}
                (out / record.case_id / f"k{k}").mkdir(parents=True, exist_ok=True)
                items.append(item)
                queue.append((item, image, ImageKey(record.case_id, k)))
                if len(queue) >= BATCH:
                    flush()
        except CaseError as e:
            items.append({**base, "status": Status.FAILED, "error_code": e.code, "error_message": e.message})
    flush()
    index = {
        "tiny_models": models.tiny,
        "notice": "TINY random models: masks are meaningless" if models.tiny else "",
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "models": models.provenance(),
        "images": items,
        "seconds": round(time.perf_counter() - start, 3),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(index, indent=2, default=str))
    return index
