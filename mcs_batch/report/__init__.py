"""`mcs-batch report`: one self-contained HTML page to look at a whole segmentation run.

summary.py     the catalog through DuckDB: counts, failure reasons, the per-pair metrics (only
               the columns needed), and which pairs get thumbnails (seeded sample + outliers)
plots.py       distributions as PNG figures (matplotlib, Agg canvas, no pyplot state)
thumbnails.py  the slices the models saw (stages.load.load_chunk) with the mask contour
page.py        the HTML page (images embedded as base64 PNG) and `write_report`, which writes
               it to OUT/qc/report-<UTC time>.html
"""

from mcs_batch.report.page import ReportSummary, write_report

__all__ = ["ReportSummary", "write_report"]
