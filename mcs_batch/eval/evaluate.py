"""`evaluate`: predictions of a segment run (OUT's catalog) against ground truth, per case and per dataset.

    truth items (datasets.list_truth)  x  catalog cases of one target
      -> match (case id, SEG series / instance UIDs, key, unique file name)
      -> per case: Dice, NSD, HD95 (metrics.py) in the prediction's geometry
      -> OUT/catalog/evaluation (a Delta table: the rows of (dataset, target) replaced in one commit)
         and a summary table

Honest counting: every truth item is a row. A failed prediction, or a truth item without any
prediction, scores Dice 0, NSD 0 and HD95 = the extent diagonal (not dropped); truth that cannot be
compared (unreadable, another geometry, ambiguous) is a `truth_error` row, listed and counted apart.
Predictions without truth are counted, not scored. 2D images without a physical pixel size are
measured in pixels (the paper's NSD tolerance: 2 pixels), everything else in mm.
"""

from __future__ import annotations

import gzip
import posixpath
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import nibabel as nib
import numpy as np

from mcs_batch.errors import CaseError, ConfigError
from mcs_batch.eval.datasets import TruthItem, strip_extension
from mcs_batch.eval.metrics import case_metrics, extent_diagonal
from mcs_batch.eval.truth import TruthError, image_mask, nifti_mask, read_seg, seg_mask
from mcs_batch.io.storage import StorageOptions, fetch_bytes, filesystem_for
from mcs_batch.outputs.catalog import EVALUATION_DIR, Catalog
from mcs_batch.outputs.reader import read_mask_image
from mcs_batch.outputs.runs import list_runs
from mcs_batch.outputs.schema import EVALUATION_SCHEMA, table_from_rows
from mcs_batch.records import CaseKind, make_case_id

SCORED = ("ok", "failed", "missing")  # statuses that count in the means
METRICS = ("dice", "nsd", "hd95")
PROGRESS_SECONDS = 10.0
SHOW_ERRORS = 10


# -- matching ------------------------------------------------------------------------------------------


def prediction_key(row: dict) -> str:
    """A case's matching key: its source path in the job's input (the key without its first folder,
    the input's name) without extension; a multi-file DICOM series: its folder."""
    keys = [k.split("/", 1)[-1] for k in row.get("source_keys") or []]
    if not keys:
        return ""
    if len(keys) > 1:
        folders = {posixpath.dirname(k) for k in keys}
        return folders.pop() if len(folders) == 1 else posixpath.commonpath(keys)
    return strip_extension(keys[0])


@dataclass
class Match:
    item: TruthItem
    candidates: list[dict]  # catalog rows (one, or a few parts of a split series)
    how: str  # case_id | series_uid | sop_uid | key | name | none | ambiguous


def match_truth(items: Sequence[TruthItem], rows: Sequence[dict]) -> list[Match]:
    """Each truth item's prediction(s): by case id, by the SEG's referenced UIDs, by key, or by a file
    name that is unique on both sides."""
    by_case = {r["case_id"]: r for r in rows}
    by_series: dict[str, list[dict]] = {}
    by_key: dict[str, list[dict]] = {}
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("series_uid"):
            by_series.setdefault(r["series_uid"], []).append(r)
        key = prediction_key(r)
        by_key.setdefault(key, []).append(r)
        by_name.setdefault(posixpath.basename(key), []).append(r)
    names = Counter(posixpath.basename(i.key) for i in items)
    out = []
    for item in items:
        name = posixpath.basename(item.key)
        if item.case_id is not None:
            found = [by_case[item.case_id]] if item.case_id in by_case else []
            out.append(Match(item, found, "case_id" if found else "none"))
        elif item.series_uids or item.sop_uids:
            found = [r for uid in item.series_uids for r in by_series.get(uid, [])]
            how = "series_uid"
            if not found:
                ids = {make_case_id(f"{p}:{s}") for s in item.sop_uids for p in ("dicom-image", "dicom-multiframe")}
                found, how = [by_case[c] for c in sorted(ids) if c in by_case], "sop_uid"
            out.append(Match(item, found, how if found else "none"))
        elif re.fullmatch(r"[0-9a-f]{24}", name) and name in by_case:
            out.append(Match(item, [by_case[name]], "case_id"))
        elif item.key in by_key:
            found = by_key[item.key]
            out.append(Match(item, found, "key" if len(found) == 1 else "ambiguous"))
        elif names[name] == 1 and len(by_name.get(name, [])) == 1:
            out.append(Match(item, by_name[name], "name"))
        else:
            out.append(Match(item, list(by_name.get(name, [])), "ambiguous" if by_name.get(name) else "none"))
    return out


# -- scoring one case ------------------------------------------------------------------------------------


def in_pixels(row: dict) -> bool:
    """2D images (and DICOM without PixelSpacing) have no physical pixel size: measure in pixels."""
    return row.get("kind") == CaseKind.IMAGE or any("pixels assumed" in w for w in row.get("warnings") or [])


def load_truth(item: TruthItem, fs, *, shape, affine, label) -> np.ndarray:
    """The item's truth as bool [I, J, K] on the prediction's grid; TruthError when impossible."""
    try:
        blobs = [fetch_bytes(fs, uri) for uri in item.uris]
    except CaseError as e:
        raise TruthError(e.message) from e
    if item.kind == "image":
        if shape[2] != 1:
            raise TruthError(f"{item.uris[0]}: a 2D mask for a volume of shape {tuple(shape)}")
        mask = np.zeros(shape, bool)
        for uri, data in zip(item.uris, blobs, strict=True):
            mask |= image_mask(data, uri=uri, shape=shape, label=label)
        return mask
    if item.kind == "nifti":
        return nifti_mask(blobs[0], uri=item.uris[0], shape=shape, affine=affine, label=label)
    return seg_mask(read_seg(blobs[0], uri=item.uris[0]), uri=item.uris[0], shape=shape, affine=affine, label=label)


def truth_extent(item: TruthItem, fs) -> tuple[list[int], list[float], str] | None:
    """(shape, spacing, unit) of a truth item on its own, to score a missing prediction; None if unknown."""
    try:
        data = fetch_bytes(fs, item.uris[0])
        if item.kind == "image":
            mask = image_mask(data, uri=item.uris[0], shape=None)
            return [mask.shape[0], mask.shape[1]], [1.0, 1.0], "px"
        if item.kind == "nifti":
            image = nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
            shape = [int(n) for n in image.shape[:3]]
            spacing = [float(z) for z in image.header.get_zooms()[: len(shape)]]
            return (shape[:2], spacing[:2], "mm") if len(shape) == 3 and shape[2] == 1 else (shape, spacing, "mm")
        ds = read_seg(data, uri=item.uris[0])
        positions = {
            tuple(frame.PlanePositionSequence[0].ImagePositionPatient)
            for frame in ds.get("PerFrameFunctionalGroupsSequence", [])
            if "PlanePositionSequence" in frame
        }
        shared = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        dy, dx = (float(v) for v in shared.PixelSpacing)
        dz = float(shared.get("SpacingBetweenSlices") or shared.get("SliceThickness") or 1.0)
        if len(positions) > 1:
            return [int(ds.Columns), int(ds.Rows), len(positions)], [dx, dy, dz], "mm"
        return [int(ds.Columns), int(ds.Rows)], [dx, dy], "mm"
    except Exception:  # only the HD95 of a missing prediction depends on it: unknown is null
        return None


@dataclass
class Scorer:
    """Scores matches; holds the filesystems and the settings of one evaluation."""

    out_storage: object  # StorageOptions of OUT (its masks)
    truth_fs: object
    tolerance: float = 2.0
    label: str | None = None

    def score(self, match: Match) -> dict:
        item = match.item
        row = {"truth_key": item.key, "truth_uris": list(item.uris), "truth_kind": item.kind,
               "matched_by": match.how, "tolerance": self.tolerance}  # fmt: skip
        if match.how == "ambiguous":
            ids = ", ".join(r["case_id"] for r in match.candidates[:3])
            message = f"{item.key}: matches {len(match.candidates)} predictions ({ids}): use --mapping"
            return {**row, "status": "truth_error", "error_code": "bad_truth", "error_message": message}
        if not match.candidates:
            return self._zero(row, item, None, "missing", "no_prediction", f"{item.key}: no prediction for this truth")
        errors = []
        for pred in match.candidates:  # several only for a split series: the part the truth fits
            try:
                return self._score_one(row, pred, item)
            except TruthError as e:
                errors.append(str(e))
        return {**self._pred_fields(row, match.candidates[0]), "status": "truth_error", "error_code": "bad_truth",
                "error_message": "; ".join(errors)}  # fmt: skip

    def _pred_fields(self, row: dict, pred: dict) -> dict:
        return {**row, "case_id": pred["case_id"], "mask_uri": pred.get("mask_uri"),
                "source_keys": pred.get("source_keys"), "config_hash": pred.get("config_hash"),
                "tiny_models": pred.get("tiny_models"), "run_id": pred.get("run_id")}  # fmt: skip

    def _zero(self, row: dict, item: TruthItem, pred: dict | None, status: str, code: str, message: str) -> dict:
        """A failed or missing prediction: Dice 0, NSD 0, HD95 the extent diagonal where it is known."""
        if pred is not None:
            row = self._pred_fields(row, pred)
            shape = [int(n) for n in pred.get("shape") or []]
            if shape and shape[-1] == 1:
                shape = shape[:2]
            unit = "px" if in_pixels(pred) else "mm"
            spacing = [1.0] * len(shape) if unit == "px" else list(pred.get("spacing_mm") or [1.0] * 3)[: len(shape)]
            extent = (shape, spacing, unit) if shape else None
        else:
            extent = truth_extent(item, self.truth_fs)
        hd95 = extent_diagonal(extent[0], extent[1]) if extent else None
        geometry = (
            {"shape": extent[0], "spacing": extent[1], "unit": extent[2], "ndim": len(extent[0])} if extent else {}
        )
        return {**row, **geometry, "status": status, "error_code": code, "error_message": message,
                "dice": 0.0, "nsd": 0.0, "hd95": hd95, "pred_voxels": 0}  # fmt: skip

    def _score_one(self, row: dict, pred: dict, item: TruthItem) -> dict:
        if pred.get("status") != "ok" or not pred.get("mask_uri"):
            code = pred.get("error_code") or pred.get("status") or "failed"
            message = pred.get("error_message") or f"prediction {pred['status']}"
            return self._zero(row, item, pred, "failed", code, message)
        try:
            image = read_mask_image(pred["mask_uri"], self.out_storage)
            predicted = np.asarray(image.dataobj) > 0
        except Exception as e:
            message = f"{pred['mask_uri']}: {type(e).__name__}: {e}"
            return self._zero(row, item, pred, "failed", "unreadable_mask", message)
        while predicted.ndim < 3:
            predicted = predicted[..., None]
        truth = load_truth(item, self.truth_fs, shape=predicted.shape, affine=image.affine, label=self.label)
        pixels = in_pixels(pred)
        spacing = [1.0, 1.0, 1.0] if pixels else [float(z) for z in image.header.get_zooms()[:3]]
        if predicted.shape[2] == 1:
            predicted, truth, spacing = predicted[:, :, 0], truth[:, :, 0], spacing[:2]
        m = case_metrics(predicted, truth, spacing=spacing, tolerance=self.tolerance)
        return {**self._pred_fields(row, pred), "status": "ok", "dice": m.dice, "nsd": m.nsd, "hd95": m.hd95,
                "unit": "px" if pixels else "mm", "ndim": predicted.ndim, "shape": list(predicted.shape),
                "spacing": spacing, "truth_voxels": m.truth_voxels, "pred_voxels": m.pred_voxels}  # fmt: skip


# -- the command's core ------------------------------------------------------------------------------------


@dataclass
class Stat:
    mean: float
    median: float
    std: float  # sample standard deviation (n - 1); nan for one value
    count: int


@dataclass
class EvaluationResult:
    dataset: str
    target: str
    rows: list[dict]
    unmatched_predictions: int  # catalog cases of the target that no truth item matched
    table_uri: str = ""
    problems: list[str] = field(default_factory=list)  # from the truth listing
    seconds: float = 0.0

    @property
    def by_status(self) -> dict[str, int]:
        return dict(Counter(r["status"] for r in self.rows))

    def stat(self, metric: str) -> Stat:
        values = np.asarray([r[metric] for r in self.rows if r["status"] in SCORED and r.get(metric) is not None])
        if values.size == 0:
            return Stat(float("nan"), float("nan"), float("nan"), 0)
        std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
        return Stat(float(values.mean()), float(np.median(values)), std, int(values.size))

    @property
    def unit(self) -> str:
        units = {r.get("unit") for r in self.rows if r["status"] in SCORED and r.get("unit")}
        return units.pop() if len(units) == 1 else ("mixed mm/px" if units else "-")

    def lines(self) -> list[str]:
        counts = self.by_status
        lines = [
            f"dataset {self.dataset}, target {self.target}: {len(self.rows)} truth case(s): ok {counts.get('ok', 0)}, "
            f"failed {counts.get('failed', 0)}, missing {counts.get('missing', 0)} (both scored 0), "
            f"truth errors {counts.get('truth_error', 0)} (not scored); "
            f"{self.unmatched_predictions} prediction(s) without truth (not scored)",
            f"  {'metric':<16}{'mean':>9}{'median':>9}{'std':>9}{'count':>7}",
        ]
        tolerances = {r.get("tolerance") for r in self.rows}
        tol = f"{tolerances.pop():g} {self.unit}" if len(tolerances) == 1 else "?"
        for metric, label, scale in (("dice", "Dice %", 100), ("nsd", f"NSD % ({tol})", 100),
                                     ("hd95", f"HD95 ({self.unit})", 1)):  # fmt: skip
            s = self.stat(metric)
            cells = [_fmt(v * scale) for v in (s.mean, s.median, s.std)]
            lines.append(f"  {label:<16}{cells[0]:>9}{cells[1]:>9}{cells[2]:>9}{s.count:>7}")
        errors = [r["error_message"] for r in self.rows if r["status"] == "truth_error"]
        lines += [f"  truth error: {message}" for message in errors[:SHOW_ERRORS]]
        if len(errors) > SHOW_ERRORS:
            lines.append(f"  ... and {len(errors) - SHOW_ERRORS} more truth errors (status truth_error in the table)")
        return lines


def _fmt(value: float) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.2f}"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "dataset"


def _ablations(catalog: Catalog) -> dict[str, str]:
    """run_id -> the run's `ablation` setting, from its run record."""
    return {record.run_id: record.ablation for record in list_runs(catalog)}


def choose_target(rows: Sequence[dict], target: str | None, out: str) -> str:
    targets = sorted({r["target"] for r in rows})
    if not targets:
        raise ConfigError(f"{out}: the catalog has no cases (run `mcs-batch segment ... --out {out}` first)")
    if target is None:
        if len(targets) > 1:
            raise ConfigError(f"{out} has targets {', '.join(targets)}: choose one with --target")
        return targets[0]
    if target not in targets:
        raise ConfigError(f"{out}: no target {target!r} (targets: {', '.join(targets)})")
    return target


def evaluate(
    out: str,
    items: Sequence[TruthItem],
    *,
    truth_root: str,
    dataset: str,
    target: str | None = None,
    storage: StorageOptions | None = None,
    tolerance: float = 2.0,
    label: str | None = None,
    problems: Sequence[str] = (),
    progress: Callable[[str], None] = print,
) -> EvaluationResult:
    """Score every truth item against OUT's predictions of `target`, write the evaluation table."""
    start = time.perf_counter()
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0, got {tolerance}")
    catalog = Catalog(out, storage=storage)
    cases = catalog.cases().to_pylist()
    target = choose_target(cases, target, out)
    rows = [r for r in cases if r["target"] == target]
    matches = match_truth(items, rows)
    truth_fs, _ = filesystem_for(truth_root, storage)
    scorer = Scorer(out_storage=storage, truth_fs=truth_fs, tolerance=tolerance, label=label)
    ablations = _ablations(catalog)
    evaluation_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    now = datetime.now(UTC).isoformat()
    results, last = [], time.monotonic()
    for n, m in enumerate(matches, start=1):
        row = scorer.score(m)
        row.update(dataset=dataset, target=target, evaluation_id=evaluation_id, evaluated_at=now,
                   ablation=ablations.get(row.get("run_id") or "", None))  # fmt: skip
        results.append(row)
        if time.monotonic() - last >= PROGRESS_SECONDS:
            last = time.monotonic()
            progress(f"evaluated {n} of {len(matches)} truth case(s)")
    matched = {r.get("case_id") for r in results}
    result = EvaluationResult(
        dataset=dataset,
        target=target,
        rows=results,
        unmatched_predictions=sum(1 for r in rows if r["case_id"] not in matched),
        problems=list(problems),
    )
    catalog.replace_evaluation(dataset, target, table_from_rows(results, EVALUATION_SCHEMA))
    result.table_uri = catalog.uri(EVALUATION_DIR)
    result.seconds = time.perf_counter() - start
    return result


def read_evaluation(out: str, *, storage: StorageOptions | None = None):
    """Every evaluation table under OUT (all datasets and targets) as one Arrow table."""
    return Catalog(out, storage=storage).evaluation()
