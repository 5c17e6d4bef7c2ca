"""Distributions of a run's metrics as PNG figures: histograms per target, one figure per metric.

matplotlib's object API on an Agg canvas (no pyplot, no global backend or figure state), so that
plots can be drawn in any process, on any machine, without a display. Every figure is
FIGURE_PX pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mcs_batch.report.summary import size_of

FIGURE_INCHES, DPI = (7.2, 3.0), 100
FIGURE_PX = (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))  # (width, height)
MAX_TARGETS = 8  # targets drawn per figure (the most frequent), so a legend stays readable
BINS = 40


@dataclass(frozen=True)
class Plot:
    title: str
    png: bytes
    note: str = ""  # what the figure leaves out, e.g. empty masks on a log axis


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(panels: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    return fig, [fig.add_subplot(1, panels, n + 1) for n in range(panels)]


def _by_target(targets: np.ndarray, values: np.ndarray, keep: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """[(target, values)] of the MAX_TARGETS targets with the most finite values under `keep`."""
    keep = keep & np.isfinite(values)
    names, n = np.unique(targets[keep], return_counts=True)
    order = np.argsort(-n, kind="stable")[:MAX_TARGETS]
    return [(str(names[i]), values[keep & (targets == names[i])]) for i in order]


def _histograms(ax, series: list[tuple[str, np.ndarray]], *, xlabel: str, log: bool = False, bounds=None) -> None:
    values = np.concatenate([v for _, v in series]) if series else np.array([])
    if not len(values):
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        return
    low, high = values.min(), values.max()
    if bounds:  # the usual range, widened by any value outside it
        low, high = min(bounds[0], low), max(bounds[1], high)
    if log:
        low, high = np.log10(low), np.log10(high)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, BINS + 1)
    if log:
        edges = 10.0**edges
        ax.set_xscale("log")
    for name, v in series:
        ax.hist(v, bins=edges, histtype="step", linewidth=1.5, label=f"{name} (n={len(v):,})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.legend(fontsize="small")


def distribution_plots(table: pa.Table) -> list[Plot]:
    """The report's figures from the metric columns (summary.METRIC_COLUMNS) of every pair: mask size
    per target (ml where the voxel size is known, else voxels; log axis, empty masks counted in a note),
    SAM scores, saliency mean and max, and uncertainty when any refined target has it."""
    targets = np.asarray(table.column("target").to_pylist(), dtype=object)
    ok = np.asarray(table.column("status").to_pylist(), dtype=object) == "ok"

    def column(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False).astype(float)

    plots = []
    size, in_ml = size_of(table)
    for unit, rows, label in ((True, ok & in_ml, "mask volume (ml)"),
                              (False, ok & ~in_ml, "mask size (voxels; pixel size unknown)")):  # fmt: skip
        if not rows.any():
            continue
        fig, (ax,) = _figure(1)
        _histograms(ax, _by_target(targets, size, rows & (size > 0)), xlabel=label, log=True)
        empty = int((rows & (size == 0)).sum())
        plots.append(Plot(f"Mask {'volume' if unit else 'size'} per target", _png(fig),
                          note=f"{empty:,} empty mask(s) not on the log axis" if empty else ""))  # fmt: skip
    fig, (ax,) = _figure(1)
    _histograms(ax, _by_target(targets, column("sam_score_mean"), ok), xlabel="SAM score (case mean)", bounds=(0, 1))
    plots.append(Plot("SAM scores per target", _png(fig)))
    fig, axes = _figure(2)
    for ax, name in zip(axes, ("saliency_mean", "saliency_max"), strict=True):
        _histograms(ax, _by_target(targets, column(name), ok), xlabel=name.replace("_", " "), bounds=(0, 1))
    plots.append(Plot("Saliency per target (case mean of slice mean / max)", _png(fig)))
    uncertainty = column("uncertainty")
    if np.isfinite(uncertainty).any():
        fig, (ax,) = _figure(1)
        _histograms(ax, _by_target(targets, uncertainty, ok), xlabel="uncertainty (refined targets)")
        plots.append(Plot("Uncertainty per target", _png(fig)))
    return plots
