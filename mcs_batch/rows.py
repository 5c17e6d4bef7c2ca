"""The row format of the segmentation pipeline: every column a stage reads or writes, in one place.

Rows that flow through the pipeline are of two types, told apart by `slice_index`:

- a **case row** (slice_index == CASE_ROW): `case_json` holds the case record (records.CaseRecord) as
  JSON and `n_slices` says how many slice rows of that case will follow;
- a **chunk row** (slice_index = k0 >= 0, n_slices = n): slices k0..k0+n-1 of a case, still to be
  decoded; the load stage turns it into n **slice rows** (n_slices = 1), each one 2D image.

Columns of a slice row, stage by stage (j is a target's position in the config's targets):

    load       image (uint8 RGB [H, W, 3]), error_code, error_message, load_s, load_at
    saliency   t{j}_saliency (float32 [H, W] in [0, 1], image frame), saliency_s, saliency_at,
               clip_sha256, models_tiny; then, in the same actor (the maps never leave it):
    prompts    t{j}_prompts (PromptRecord as JSON), t{j}_premask (bit-packed ablation mask, or b"");
               t{j}_saliency dropped
    masking    t{j}_mask (bit-packed bool [H, W]), t{j}_score, t{j}_pixels, height, width, sam_s, sam_at,
               sam_sha256; image and t{j}_premask dropped
    parts      (stages/assemble.write_parts) slice rows leave the stream into staging parts; what goes
               on is one row per part: case_id, row_kind ("part" / "case" / "done"), n_slices,
               case_json, part_uri, result (a "done" row: the pickled assemble_cases result of the
               cases assembled in the block, else b""), first_/last_ of each *_at (seconds since
               the epoch: when a stage finished)

*_s are seconds spent per slice in a stage; *_at wall-clock times (for the stages' overlap).

A row with a non-empty error_code carries no image (NO_IMAGE); stages pass it through untouched.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from mcs_batch.errors import ErrorCode
from mcs_batch.records import CaseRecord

CASE_ROW = -1
NO_IMAGE = np.zeros((1, 1, 3), np.uint8)  # placeholder in rows without an image (Arrow needs a value)
NO_MAP = np.zeros((1, 1), np.float32)  # placeholder saliency map of a row without an image


def target_column(index: int, what: str) -> str:
    """Per-target columns are named by the target's position: t0_saliency, t1_mask, ..."""
    return f"t{index}_{what}"


# -- rows -------------------------------------------------------------------------------------------


def case_row(
    record: CaseRecord,
    n_slices: int,
    done_targets: list[str] | tuple[str, ...] = (),
    redo: dict[str, dict] | None = None,
) -> dict:
    """The case row: the record as JSON, with the targets a previous run already committed and, for
    the targets redone (a retried failure, a grown series), the committed row each new one replaces
    (target -> {replaces: run id, attempts, history}: outputs/catalog.CommittedPairs), and the failure
    rows of its objects as cases of their own that its commit deletes (`absorbs`: {case_id: run id})."""
    info = {**record.to_row(), "done_targets": list(done_targets)}
    if redo:
        info["redo"] = dict(redo)
    return {"case_id": record.case_id, "slice_index": CASE_ROW, "n_slices": n_slices, "case_json": json.dumps(info)}


def chunk_row(case: dict, k0: int, n: int) -> dict:
    """Slices k0..k0+n-1 of the case whose case row is `case`."""
    return {"case_id": case["case_id"], "slice_index": k0, "n_slices": n, "case_json": case["case_json"]}


def slice_row(case_id: str, k: int, image: np.ndarray, seconds: float, code: str = "", message: str = "") -> dict:
    """A decoded slice (or, with an error code, a slice that could not be decoded)."""
    return {
        "case_id": case_id,
        "slice_index": k,
        "n_slices": 1,
        "case_json": "",
        "image": image,
        "error_code": str(code),
        "error_message": message,
        "load_s": seconds,
        "load_at": time.time(),
    }


def case_of(row: dict) -> CaseRecord:
    """The case record of a case or chunk row."""
    return CaseRecord.from_row(json.loads(row["case_json"]))


def columns(rows: list[dict]) -> dict:
    """Rows (dicts with the same keys) -> a column batch; {} for no rows."""
    return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}


# -- batches in flight ------------------------------------------------------------------------------


def model_rows(batch: dict) -> list[int]:
    """Indices of the rows of a batch that carry an image to process (slice rows without an error)."""
    return [
        i
        for i, (k, code) in enumerate(zip(batch["slice_index"], batch["error_code"], strict=True))
        if k >= 0 and not code
    ]


def fail_rows(batch: dict, rows: list[int], code: ErrorCode, message: str) -> None:
    """Mark rows of a batch failed (their images are then skipped by later stages)."""
    codes, messages = list(batch["error_code"]), list(batch["error_message"])
    for i in rows:
        codes[i], messages[i] = str(code), message
    batch["error_code"], batch["error_message"] = np.array(codes, dtype=object), np.array(messages, dtype=object)


# -- per-slice results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRecord:
    """What the prompts stage found on one (slice, target), as it travels to SAM and into the catalog.

    boxes_xyxy: [[x0, y0, x1, y1], ...] pixels, image frame; points_xy: [[x, y], ...];
    reason: an error code (empty_saliency) when there is nothing to prompt with, else None;
    n_components: connected components kept in the coarse mask; saliency_mean / _max: of the map.
    """

    boxes_xyxy: list[list[float]]
    points_xy: list[list[float]]
    reason: str | None
    n_components: int
    saliency_mean: float
    saliency_max: float

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> PromptRecord:
        return cls(**json.loads(text))

    def boxes(self) -> np.ndarray:
        """float32 [N, 4]"""
        return np.asarray(self.boxes_xyxy, np.float32).reshape(-1, 4)

    def points(self) -> np.ndarray:
        """float32 [P, 2]"""
        return np.asarray(self.points_xy, np.float32).reshape(-1, 2)


def pack_mask(mask_hw: np.ndarray) -> bytes:
    """bool [H, W] -> bit-packed bytes (8x smaller while slices travel between stages)."""
    return np.packbits(np.asarray(mask_hw, bool).ravel()).tobytes()


def unpack_mask(data: bytes, shape_hw: tuple[int, int]) -> np.ndarray:
    """The inverse of pack_mask: bool [H, W]."""
    n = shape_hw[0] * shape_hw[1]
    return np.unpackbits(np.frombuffer(data, np.uint8), count=n).astype(bool).reshape(shape_hw)
