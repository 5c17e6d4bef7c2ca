"""The report page: one self-contained HTML file (every image a base64 PNG in the page), written to
OUT/qc/report-<UTC time>.html with the catalog's atomic write (local disk or object store alike).

Sections (element ids): summary, counts, failures, distributions, outliers, sample, notes. Each case
shown is a <figure class="case"> with data-case-id / data-target, captioned with its case id, target,
source keys and mask file. No patient name, id or DICOM UID is written: cases are named by case id.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from PIL import Image

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError
from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.reader import job_config_of_run
from mcs_batch.report.plots import Plot, distribution_plots
from mcs_batch.report.summary import Counts, Pick, counts, details, metrics, open_catalog, pick
from mcs_batch.report.thumbnails import case_views, thumbnail

QC_DIR = "qc"
DEFAULT_SAMPLE = 12  # randomly sampled ok pairs
PER_OUTLIER = 3  # pairs per outlier category (empty, large, small, lowest SAM score)
MAX_THUMBNAILS = 48  # images decoded per report, whatever the catalog's size (two per volume at most)
MAX_KEYS = 3  # source keys written per case (a series has one per file)


@dataclass(frozen=True)
class Thumb:
    label: str  # "image", "largest mask area", "middle slice"
    slice_index: int
    png: bytes
    size: tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class Shown:
    """A picked pair on the page: its catalog row (summary.DETAIL_COLUMNS) and thumbnails, or why none."""

    pick: Pick
    row: dict
    thumbs: list[Thumb] = field(default_factory=list)
    problem: str = ""


@dataclass(frozen=True)
class ReportSummary:
    uri: str
    counts: Counts
    shown: list[Shown]
    seconds: float

    @property
    def thumbnails(self) -> int:
        return sum(len(s.thumbs) for s in self.shown)

    def lines(self) -> list[str]:
        problems = sum(1 for s in self.shown if s.problem)
        return [f"report of {self.counts.cases:,} case(s), {self.counts.pairs:,} (case, target) pair(s): "
                f"{self.thumbnails} thumbnail(s) of {len(self.shown) - problems} pair(s)"
                + (f", {problems} not drawn (see the notes)" if problems else "") + f" in {self.seconds:.1f} s",
                f"written to {self.uri}"]  # fmt: skip


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def draw(picks: list[Pick], rows: dict[tuple[str, str], dict], *, out: str, storage: StorageOptions | None,
         max_thumbnails: int) -> list[Shown]:  # fmt: skip
    """Thumbnails of the picks, in order, until `max_thumbnails` images are made. A case whose source
    or mask cannot be read is shown with the reason instead (the report goes on)."""
    jobs: dict[str, JobConfig] = {}
    shown, left = [], max_thumbnails
    for p in picks:
        row = rows.get((p.case_id, p.target))
        if row is None or left <= 0:
            continue
        run_id = row.get("run_id") or ""
        if run_id not in jobs:
            jobs[run_id] = job_config_of_run(Catalog(out, storage=storage), run_id)
        try:
            views = case_views(row, jobs[run_id], storage=storage)[:left]
        except CaseError as e:
            shown.append(Shown(p, row, problem=f"{e.code}: {e.message}"))
            continue
        except (OSError, ValueError, KeyError) as e:
            shown.append(Shown(p, row, problem=f"{type(e).__name__}: {e}"))
            continue
        thumbs = []
        for view in views:
            picture = thumbnail(view.image, view.mask)
            thumbs.append(Thumb(view.label, view.slice_index, _png(picture), (picture.shape[1], picture.shape[0])))
        left -= len(thumbs)
        shown.append(Shown(p, row, thumbs))
    return shown


def write_report(
    out: str,
    *,
    storage: StorageOptions | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    per_outlier: int = PER_OUTLIER,
    max_thumbnails: int = MAX_THUMBNAILS,
    now: datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReportSummary:
    """Write OUT's QC report; ConfigError when OUT has no catalog. Reads the metric columns of every
    pair, and decodes images only for the picked pairs (at most `max_thumbnails` slices)."""
    start = time.perf_counter()
    now = now or datetime.now(UTC)
    con = open_catalog(out, storage)
    try:
        numbers = counts(con)
        table = metrics(con)
        picks = pick(table, sample=sample, per_outlier=per_outlier, seed=seed)
        rows = details(con, picks)
    finally:
        con.close()
    if progress:
        progress(f"report: {numbers.pairs:,} pair(s) read; drawing plots and up to {max_thumbnails} thumbnail(s)")
    plots = distribution_plots(table)
    shown = draw(picks, rows, out=out, storage=storage, max_thumbnails=max_thumbnails)
    catalog = Catalog(out, storage=storage)
    name = f"report-{now.strftime('%Y%m%dT%H%M%SZ')}.html"
    page = render(
        out, numbers, plots, shown, seed=seed, now=now, left_out=len(picks) - len(shown), max_thumbnails=max_thumbnails
    )
    catalog.write_bytes(catalog.path(QC_DIR, name), page.encode())
    return ReportSummary(catalog.uri(QC_DIR, name), numbers, shown, time.perf_counter() - start)


# -- HTML ------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
td.n{text-align:right}.tiny{background:#fdd;color:#900;font-weight:bold;padding:.5em;border:2px solid #900}
.cases{display:flex;flex-wrap:wrap;gap:12px}figure.case{margin:0;padding:6px;border:1px solid #ccc;width:400px}
figure.case img{background:#000;margin-right:4px}figcaption{font-size:12px;word-break:break-all}
.why{color:#a50;font-weight:bold}.plot{margin:.5em 0}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(head: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f'<td class="n">{v:,}</td>' if isinstance(v, int) else f"<td>{_e(v)}</td>"

    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr>{body}</table>"


def _img(png: bytes, size: tuple[int, int], alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img src="data:image/png;base64,{data}" width="{size[0]}" height="{size[1]}" alt="{_e(alt)}">'


def _case(s: Shown) -> str:
    row, p = s.row, s.pick
    keys = list(row.get("source_keys") or [])
    more = f" and {len(keys) - MAX_KEYS} more" if len(keys) > MAX_KEYS else ""
    size = (f"{row['mask_volume_ml']:.3g} ml" if row.get("mask_volume_ml") is not None
            else f"{row.get('mask_voxels') or 0:,} voxels")  # fmt: skip
    sam = f", SAM {row['sam_score_mean']:.3f}" if row.get("sam_score_mean") is not None else ""
    images = "".join(
        f"<div>{_img(t.png, t.size, f'{p.case_id} {p.target} slice {t.slice_index}')}"
        f"<br><small>{_e(t.label)} (k={t.slice_index})</small></div>"
        for t in s.thumbs
    )
    mask = row.get("mask_uri") or ""
    return (
        f'<figure class="case" id="case-{_e(p.case_id)}-{_e(p.target)}" data-case-id="{_e(p.case_id)}" '
        f'data-target="{_e(p.target)}"><div style="display:flex">{images}</div>'
        + (f'<p class="problem">not drawn: {_e(s.problem)}</p>' if s.problem else "")
        + f'<figcaption><span class="why">{_e(", ".join(p.why))}</span><br>case <b>{_e(p.case_id)}</b> · '
        f"target {_e(p.target)} · {_e(row.get('kind') or '')} · {_e(size)}{_e(sam)}<br>"
        f"source: {_e(', '.join(keys[:MAX_KEYS]))}{_e(more)}<br>"
        f'mask: <a href="{_e(mask)}">{_e(mask)}</a></figcaption></figure>'
    )


def render(out: str, numbers: Counts, plots: list[Plot], shown: list[Shown], *, seed: int, now: datetime,
           left_out: int = 0, max_thumbnails: int = MAX_THUMBNAILS) -> str:  # fmt: skip
    """The page as one HTML string."""
    statuses = sorted({s for _, by in numbers.by_target for s in by})
    tiny = ""
    if numbers.tiny_pairs:
        tiny = (f'<p class="tiny" id="tiny-models">TINY RANDOM MODELS: {numbers.tiny_pairs:,} of {numbers.pairs:,} '
                "pair(s) come from runs with tiny random models; their masks are meaningless.</p>")  # fmt: skip
    outliers = [s for s in shown if s.pick.outlier]
    sampled = [s for s in shown if not s.pick.outlier]
    notes = [f"{_e(s.pick.case_id)} ({_e(s.pick.target)}): {_e(s.problem)}" for s in shown if s.problem]
    if left_out:
        notes.append(f"{left_out} picked pair(s) not drawn: the report draws at most {max_thumbnails} thumbnails")
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>QC report: {_e(out)}</title>',
        f"<style>{STYLE}</style></head><body>",
        f'<section id="summary"><h1>QC report</h1><p>{_e(out)}<br>generated {_e(now.isoformat(timespec="seconds"))}'
        f" · {numbers.cases:,} case(s) · {numbers.pairs:,} (case, target) pair(s) · sample seed {seed}</p>{tiny}"
        "</section>",
        '<section id="counts"><h2>Counts</h2><h3>By status</h3>',
        _table(["status", "pairs", "cases"], [list(r) for r in numbers.by_status]),
        "<h3>By kind</h3>",
        _table(["kind", "pairs", "cases"], [list(r) for r in numbers.by_kind]),
        "<h3>By target</h3>",
        _table(["target", *statuses], [[t, *(by.get(s, 0) for s in statuses)] for t, by in numbers.by_target]),
        "</section>",
        '<section id="failures"><h2>Failure and skip reasons</h2>',
        _table(["status", "code", "pairs", "example"], [list(r) for r in numbers.reasons])
        if numbers.reasons
        else "<p>none</p>",
        "</section>",
        '<section id="distributions"><h2>Distributions</h2>',
        *(
            f'<div class="plot"><h3>{_e(p.title)}</h3>{_img(p.png, _size(p.png), p.title)}'
            + (f"<p>{_e(p.note)}</p>" if p.note else "")
            + "</div>"
            for p in plots
        ),
        "</section>",
        '<section id="outliers"><h2>Outliers</h2><p>Empty masks, mask sizes far from their target\'s usual '
        "(robust z-score of log size), lowest SAM scores. Green: the mask contour on the slice as the models "
        'saw it.</p><div class="cases">',
        *(_case(s) for s in outliers),
        "</div></section>",
        f'<section id="sample"><h2>Random sample</h2><p>{len(sampled)} ok pair(s), seed {seed} '
        f'(--seed).</p><div class="cases">',
        *(_case(s) for s in sampled),
        "</div></section>",
        '<section id="notes"><h2>Notes</h2>',
        "<ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>" if notes else "<p>none</p>",
        "</section></body></html>",
    ]
    return "\n".join(parts)


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size
