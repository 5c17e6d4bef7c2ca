"""Which zero-shot results become pseudo-labels: case filters on the catalog, slice filters on the masks.

Case level (catalog rows only, on the driver): the target, status ok, a non-empty mask, component
count, include / exclude lists, per-dataset caps. Slice level (in the export tasks, where the mask is
read): SAM score, mask size, agreement of the mask with the saliency prompts. Every drop has a reason,
counted in the selection record (WORK/selection.json).
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mcs_batch.outputs.catalog import Catalog
from mcs_batch.train.weak.config import SelectionConfig

CASE_COLUMNS = ["case_id", "target", "status", "kind", "source_uris", "source_keys", "modality", "shape",
                "spacing_mm", "affine", "mask_uri", "mask_voxels", "n_components", "sam_score_mean", "run_id",
                "tiny_models"]  # fmt: skip


@dataclass
class Selection:
    cases: list[dict]  # kept case rows (CASE_COLUMNS + "dataset"), sorted by case id
    dropped: Counter = field(default_factory=Counter)  # reason -> cases
    considered: int = 0

    def record(self) -> dict:
        per_dataset = Counter(c["dataset"] for c in self.cases)
        return {"considered": self.considered, "selected": len(self.cases), "dropped": dict(self.dropped),
                "per_dataset": dict(sorted(per_dataset.items()))}  # fmt: skip


def dataset_of(source_keys: list[str] | None) -> str:
    """The first folder of the case's first source key ('' for files at the root)."""
    key = (source_keys or [""])[0]
    return key.split("/", 1)[0] if "/" in key else ""


def case_drop_reason(row: dict, target: str, cfg: SelectionConfig, uncertainty: dict | None = None) -> str | None:
    """Why a catalog row is no pseudo-label (None: it is one, subject to caps and slice filters).
    `uncertainty`: case id -> an earlier ensemble's uncertainty (used with cfg.max_uncertainty)."""
    if row["target"] != target:
        return "other_target"
    if cfg.include and row["case_id"] not in cfg.include:
        return "not_included"
    if row["case_id"] in cfg.exclude:
        return "excluded"
    if row["status"] != "ok":
        return f"status_{row['status']}"
    if not row.get("mask_uri") or not row.get("mask_voxels"):
        return "empty_mask"
    if cfg.max_components and (row.get("n_components") or 0) > cfg.max_components:
        return "too_many_components"
    if cfg.max_uncertainty and uncertainty is not None:
        value = uncertainty.get(row["case_id"])
        if value is None:
            return "no_uncertainty"
        if value > cfg.max_uncertainty:
            return "too_uncertain"
    return None


def _cap_order(case_id: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{case_id}".encode())


def select_cases(rows: list[dict], target: str, cfg: SelectionConfig, uncertainty: dict | None = None) -> Selection:
    """Case-level selection over catalog rows (pure)."""
    selection = Selection(cases=[])
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        if row["target"] != target:
            continue
        selection.considered += 1
        reason = case_drop_reason(row, target, cfg, uncertainty)
        if reason:
            selection.dropped[reason] += 1
            continue
        by_dataset.setdefault(dataset_of(row.get("source_keys")), []).append(row)
    for dataset, kept in sorted(by_dataset.items()):
        kept.sort(key=lambda r: _cap_order(r["case_id"], cfg.seed))
        if cfg.max_cases_per_dataset and len(kept) > cfg.max_cases_per_dataset:
            selection.dropped["dataset_cap"] += len(kept) - cfg.max_cases_per_dataset
            kept = kept[: cfg.max_cases_per_dataset]
        selection.cases.extend({**r, "dataset": dataset} for r in kept)
    selection.cases.sort(key=lambda r: r["case_id"])
    return selection


def select_from_catalog(catalog: Catalog, target: str, cfg: SelectionConfig, *, storage=None) -> Selection:
    table = catalog.cases(CASE_COLUMNS)
    uncertainty = read_uncertainty(cfg.uncertainty_from, storage) if cfg.max_uncertainty else None
    return select_cases(table.to_pylist(), target, cfg, uncertainty)


def read_uncertainty(uri: str, storage=None) -> dict[str, float]:
    """case id -> uncertainty from refine tables (a .parquet, or a folder of them: the newest run wins)."""
    import pyarrow.parquet as pq

    from mcs_batch.errors import ConfigError
    from mcs_batch.io.storage import filesystem_for

    fs, root = filesystem_for(uri, storage)
    try:
        paths = [root] if root.endswith(".parquet") else sorted(p for p in fs.ls(root, detail=False)
                                                                if p.endswith(".parquet"))  # fmt: skip
    except FileNotFoundError as e:
        raise ConfigError(f"select.uncertainty_from {uri}: not found") from e
    out: dict[str, float] = {}
    for path in paths:  # refine run ids start with their UTC time: later files are later runs
        with fs.open(path, "rb") as f:
            for row in pq.read_table(f, columns=["case_id", "uncertainty"]).to_pylist():
                if row["uncertainty"] is not None:
                    out[row["case_id"]] = float(row["uncertainty"])
    return out


# -- slices ---------------------------------------------------------------------------------------


def bbox_xyxy(mask_hw: np.ndarray) -> tuple[float, float, float, float] | None:
    """Bounding box (x0, y0, x1, y1), pixel edges, of a [H, W] mask; None when empty."""
    ys, xs = np.nonzero(mask_hw)
    if ys.size == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def agreement(mask_hw: np.ndarray, boxes_xyxy) -> float:
    """Saliency / mask agreement in [0, 1]: IoU of the mask's bounding box and the box around all
    prompt boxes (drawn from the saliency map's coarse mask). 0 without a mask or without boxes."""
    box = bbox_xyxy(mask_hw)
    boxes = [b for b in (boxes_xyxy or []) if b is not None and len(b) == 4]
    if box is None or not boxes:
        return 0.0
    arr = np.asarray(boxes, float)
    prompt = (arr[:, 0].min(), arr[:, 1].min(), arr[:, 2].max(), arr[:, 3].max())
    return box_iou(box, prompt)


def pick_empty_slices(empty: list[int], n_labelled: int, cfg: SelectionConfig, case_id: str) -> list[int]:
    """Which slices without a mask (`empty`, slice indices) of a case with `n_labelled` trained slices
    are trained on as background: all with keep_empty_slices, else round(empty_slice_ratio *
    n_labelled) of them (at most all), drawn by the case's own generator (seed, case id): the same
    slices every run. Sorted."""
    if cfg.keep_empty_slices:
        return sorted(empty)
    n = min(len(empty), round(cfg.empty_slice_ratio * n_labelled))
    if n <= 0:
        return []
    rng = np.random.default_rng([cfg.seed, zlib.crc32(case_id.encode())])
    return sorted(int(k) for k in rng.choice(np.asarray(sorted(empty)), size=n, replace=False))


def slice_drop_reason(mask_pixels: int, sam_score: float | None, agree: float, cfg: SelectionConfig) -> str | None:
    """Why a slice of a selected case is not trained on (None: it is). Empty slices ("empty_slice"):
    kept with keep_empty_slices, else some of them by pick_empty_slices."""
    if mask_pixels < cfg.min_mask_pixels:
        return None if cfg.keep_empty_slices else "empty_slice"
    if sam_score is None or sam_score < cfg.min_sam_score:
        return "low_sam_score"
    if agree < cfg.min_agreement:
        return "low_agreement"
    return None
