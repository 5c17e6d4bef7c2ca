"""What the report says about a catalog: counts, failure reasons, metrics, and which pairs it shows.

Everything is read through DuckDB over the catalog tables' snapshots (`query.connect`), one query per
table of the page and only the columns it needs, so a 100k-case catalog costs a few megabytes. Rows
are (case, target) pairs, as in `cases`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import CASES_DIR, Catalog

# Per pair, for the plots and the choice of outliers: nothing else is read for every row.
METRIC_COLUMNS = ["case_id", "target", "status", "mask_voxels", "mask_volume_ml", "sam_score_mean",
                  "saliency_mean", "saliency_max", "uncertainty"]  # fmt: skip
# Per shown pair only: what a thumbnail needs to read the image and the mask, and its caption.
DETAIL_COLUMNS = ["case_id", "target", "kind", "source_uris", "source_keys", "status", "modality", "shape",
                  "spacing_mm", "affine", "study_uid", "series_uid", "run_id", "tiny_models", "prompts",
                  "mask_uri", "mask_voxels", "mask_volume_ml", "sam_score_mean"]  # fmt: skip


@dataclass(frozen=True)
class Counts:
    """The catalog in numbers. `pairs` counts (case, target) rows, `cases` distinct case ids."""

    pairs: int
    cases: int
    by_status: list[tuple[str, int, int]]  # (status, pairs, cases)
    by_kind: list[tuple[str, int, int]]  # (kind, pairs, cases)
    by_target: list[tuple[str, dict[str, int]]]  # (target, status -> pairs)
    reasons: list[tuple[str, str, int, str]]  # (status, error code, pairs, an example message)
    tiny_pairs: int  # pairs from runs with tiny random models (their failures too)


@dataclass(frozen=True)
class Pick:
    """A pair the report shows as thumbnails, and why (outlier categories, or "random sample")."""

    case_id: str
    target: str
    why: list[str] = field(default_factory=list)

    @property
    def outlier(self) -> bool:
        return any(w != SAMPLE for w in self.why)


SAMPLE = "random sample"
EMPTY, LARGEST, SMALLEST, LOW_SAM = "empty mask", "large for its target", "small for its target", "lowest SAM score"


def open_catalog(out: str, storage: StorageOptions | None):
    """A DuckDB connection on OUT's tables; ConfigError (one line) when OUT has no catalog."""
    from mcs_batch.query import connect

    catalog = Catalog(out, storage=storage)
    if not catalog.exists():
        raise ConfigError(f"report: {out}: no catalog here (expected {CASES_DIR}/; run `mcs-batch segment` first)")
    return connect(out, storage=storage)


def counts(con) -> Counts:
    """Counts of a connection's `cases` view (status, kind, target, failure and skip reasons)."""

    def rows(sql: str) -> list[tuple]:
        return con.sql(sql).fetchall()

    ((pairs, cases, tiny),) = rows("SELECT count(*), count(DISTINCT case_id), count(*) FILTER (WHERE tiny_models) "
                                   "FROM cases")  # fmt: skip
    by_status = rows("SELECT status, count(*), count(DISTINCT case_id) FROM cases GROUP BY 1 ORDER BY 2 DESC, 1")
    by_kind = rows("SELECT coalesce(kind, '?'), count(*), count(DISTINCT case_id) FROM cases GROUP BY 1 "
                   "ORDER BY 2 DESC, 1")  # fmt: skip
    by_target: dict[str, dict[str, int]] = {}
    for target, status, n in rows("SELECT target, status, count(*) FROM cases GROUP BY 1, 2 ORDER BY 1, 2"):
        by_target.setdefault(target, {})[status] = n
    reasons = rows("SELECT status, coalesce(error_code, '?'), count(*), min(error_message) FROM cases "
                   "WHERE status <> 'ok' GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2")  # fmt: skip
    return Counts(pairs=pairs, cases=cases, by_status=by_status, by_kind=by_kind, by_target=list(by_target.items()),
                  reasons=[(s, c, n, m or "") for s, c, n, m in reasons], tiny_pairs=tiny or 0)  # fmt: skip


def metrics(con) -> pa.Table:
    """The per-pair metric columns, sorted by (case_id, target): the order is the seeded sample's."""
    return con.sql(f"SELECT {', '.join(METRIC_COLUMNS)} FROM cases ORDER BY case_id, target").to_arrow_table()


def details(con, picks: list[Pick]) -> dict[tuple[str, str], dict]:
    """(case_id, target) -> the detail columns of the picked pairs (one join, not a query per pair)."""
    if not picks:
        return {}
    keys = pa.table({"case_id": [p.case_id for p in picks], "target": [p.target for p in picks]})
    con.register("picked", keys)
    try:
        table = con.sql(f"SELECT {', '.join('c.' + c for c in DETAIL_COLUMNS)} FROM cases c "
                        "JOIN picked p ON c.case_id = p.case_id AND c.target = p.target").to_arrow_table()  # fmt: skip
    finally:
        con.unregister("picked")
    return {(r["case_id"], r["target"]): r for r in table.to_pylist()}


def size_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(size, in_ml) per row: mask_volume_ml where known, else mask_voxels (NaN when neither)."""
    ml = table.column("mask_volume_ml").to_numpy(zero_copy_only=False).astype(float)
    voxels = table.column("mask_voxels").to_numpy(zero_copy_only=False).astype(float)
    in_ml = ~np.isnan(ml)
    return np.where(in_ml, ml, voxels), in_ml


def relative_size(table: pa.Table) -> np.ndarray:
    """Robust z-score of log(size) of each non-empty ok mask within its (target, unit) group (NaN
    elsewhere): how far a mask is from the usual size of its target."""
    size, in_ml = size_of(table)
    ok = np.asarray(table.column("status").to_pylist(), dtype=object) == "ok"
    targets = np.asarray(table.column("target").to_pylist(), dtype=object)
    score = np.full(len(size), np.nan)
    usable = ok & (size > 0) & ~np.isnan(size)
    for target in np.unique(targets[usable]):
        for unit in (True, False):
            group = usable & (targets == target) & (in_ml == unit)
            if group.sum() < 2:
                continue
            logs = np.log(size[group])
            median = np.median(logs)
            spread = 1.4826 * np.median(np.abs(logs - median)) or np.std(logs) or 1.0
            score[group] = (logs - median) / spread
    return score


def pick(table: pa.Table, *, sample: int, per_outlier: int, seed: int) -> list[Pick]:
    """Outliers first (empty masks, sizes far from their target's usual, lowest SAM scores; up to
    `per_outlier` each), then a seeded random sample of `sample` other ok pairs. `table` holds
    METRIC_COLUMNS sorted by (case_id, target), so the same catalog and seed give the same picks."""
    rng = np.random.default_rng(seed)
    ids, targets = table.column("case_id").to_pylist(), table.column("target").to_pylist()
    ok = np.asarray(table.column("status").to_pylist(), dtype=object) == "ok"
    voxels = table.column("mask_voxels").to_numpy(zero_copy_only=False).astype(float)
    sam = table.column("sam_score_mean").to_numpy(zero_copy_only=False).astype(float)
    z = relative_size(table)
    chosen: dict[int, list[str]] = {}

    def take(rows: np.ndarray, why: str) -> None:
        for i in rows[:per_outlier]:
            chosen.setdefault(int(i), []).append(why)

    empty = np.flatnonzero(ok & (voxels == 0))
    take(rng.permutation(empty), EMPTY)
    scored = np.flatnonzero(~np.isnan(z))
    take(scored[np.argsort(-z[scored], kind="stable")], LARGEST)
    take(scored[np.argsort(z[scored], kind="stable")], SMALLEST)
    with_sam = np.flatnonzero(ok & (voxels > 0) & ~np.isnan(sam))
    take(with_sam[np.argsort(sam[with_sam], kind="stable")], LOW_SAM)
    free = ok.copy()
    free[list(chosen)] = False
    rest = np.flatnonzero(free)
    for i in rng.permutation(rest)[:sample]:
        chosen[int(i)] = [SAMPLE]
    return [Pick(ids[i], targets[i], why) for i, why in chosen.items()]
