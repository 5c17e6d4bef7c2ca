"""The QC report on a catalog over real source files: the page's structure, its images, its numbers,
the cases it shows, and the slices as the models saw them."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mcs_batch.cli import main
from mcs_batch.config import JobConfig
from mcs_batch.io.display import to_display
from mcs_batch.io.storage import StorageOptions
from mcs_batch.io.volume import plane
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.report import write_report
from mcs_batch.report.plots import FIGURE_PX
from mcs_batch.report.summary import EMPTY, LOW_SAM, SAMPLE, SMALLEST, pick
from mcs_batch.report.thumbnails import THUMB_SIDE, case_views, slices_to_show, thumbnail, thumbnail_size
from mcs_batch.stages.load import load_chunk
from mcs_batch.train.weak.export import read_mask, record_of
from tests.report.cohort import TARGET, write_inputs, write_run

SECTIONS = ["summary", "counts", "failures", "distributions", "outliers", "sample", "notes"]


class Page(HTMLParser):
    """What the tests read from a report: section ids, images (with their section), case figures,
    the tables of each section (lists of rows of cell texts), and all text."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.figures, self.tables, self.text = [], [], [], {}, []
        self._section, self._row, self._cell = "", None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a["id"]
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append((self._section, a))
        elif tag == "figure":
            self.figures.append((self._section, a["data-case-id"], a["data-target"]))
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self.tables[self._section][-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    import base64

    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    folder = tmp_path_factory.mktemp("report")
    out = folder / "out"
    return out, write_run(write_inputs(folder), str(out))


def read_report(uri: str) -> Page:
    return Page(Path(uri.removeprefix("file://")).read_text())


def test_the_report_has_its_sections_images_counts_and_cases(run):
    out, rows = run
    summary = write_report(str(out), sample=4, seed=1, per_outlier=1, now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert summary.uri.endswith("/qc/report-20260102T030405Z.html")
    page = read_report(summary.uri)
    assert page.sections == SECTIONS

    for section, img in page.images:  # every embedded image decodes, at the size the page says
        image = decode(img["src"])
        image.load()
        assert image.size == (int(img["width"]), int(img["height"]))
        if section == "distributions":
            assert image.size == FIGURE_PX
        else:
            assert max(image.size) == THUMB_SIDE and image.mode == "RGB"
    plots = [img for s, img in page.images if s == "distributions"]
    assert [img["alt"] for img in plots] == ["Mask volume per target", "Mask size per target", "SAM scores per target",
        "Saliency per target (case mean of slice mean / max)", "Uncertainty per target"]  # fmt: skip

    catalog = Catalog(str(out)).cases(["case_id", "target", "status", "kind", "error_code"]).to_pylist()
    ids = {r["case_id"] for r in catalog}
    by_key = {k: r["case_id"] for k, r in rows.items()}
    outliers = {(c, t) for s, c, t in page.figures if s == "outliers"}
    sampled = {(c, t) for s, c, t in page.figures if s == "sample"}
    assert {c for c, _ in outliers | sampled} <= ids and not outliers & sampled
    assert (by_key["img00.png"], TARGET) in outliers  # the empty mask
    assert (by_key["img04.png"], TARGET) in outliers  # the one-pixel mask
    assert (by_key["vol.nii.gz"], TARGET) in outliers  # the lowest SAM score
    assert len(sampled) == 4
    assert all(c.startswith(("f0", "sss")) is False for c, _ in outliers | sampled)  # failures get no thumbnails
    n_images = {(c, t): 0 for _, c, t in page.figures}
    assert summary.thumbnails == sum(1 for s, _ in page.images if s in ("outliers", "sample"))
    assert len(n_images) == len(summary.shown)

    # the numbers are the catalog's
    status_rows = {r[0]: [int(v.replace(",", "")) for v in r[1:]] for r in page.tables["counts"][0][1:]}
    for status in ("ok", "failed", "skipped"):
        pairs = [r for r in catalog if r["status"] == status]
        assert status_rows[status] == [len(pairs), len({r["case_id"] for r in pairs})]
    kinds = {r[0]: [int(v) for v in r[1:]] for r in page.tables["counts"][1][1:]}
    assert kinds == {k: [sum(r["kind"] == k for r in catalog), len({r["case_id"] for r in catalog if r["kind"] == k})]
                     for k in {r["kind"] for r in catalog}}  # fmt: skip
    targets = {r[0]: r[1:] for r in page.tables["counts"][2][1:]}
    assert page.tables["counts"][2][0] == ["target", "failed", "ok", "skipped"]
    assert targets == {TARGET: ["2", "7", "1"], f"{TARGET}@weak": ["0", "1", "0"]}
    reasons = {(r[0], r[1]): (int(r[2]), r[3]) for r in page.tables["failures"][0][1:]}
    assert reasons == {("failed", "decode_error"): (2, "file:///in/broken0.png: truncated"),
                       ("skipped", "not_an_image"): (1, "in/rt.dcm: RTSTRUCT")}  # fmt: skip
    assert (summary.counts.pairs, summary.counts.cases) == (len(catalog), len(ids))

    text = " ".join(page.text)
    assert "TINY RANDOM MODELS" in text and "5 of 11 pair(s)" in text
    for row in rows.values():  # UIDs stay out of the page (cases are named by case id)
        for uid in (row.get("study_uid"), row.get("series_uid")):
            assert not uid or uid not in text
    assert rows["ct"]["mask_uri"] in text and "in/ct/" in text  # captions: mask file and source keys


def test_the_same_seed_picks_the_same_cases_and_the_thumbnails_are_bounded(run):
    out, _ = run
    first = write_report(str(out), sample=3, seed=7)
    again = write_report(str(out), sample=3, seed=7)
    assert [(s.pick.case_id, s.pick.why) for s in first.shown] == [(s.pick.case_id, s.pick.why) for s in again.shown]
    bounded = write_report(str(out), sample=10, seed=7, max_thumbnails=3)
    assert bounded.thumbnails == 3
    assert "not drawn" in Path(bounded.uri.removeprefix("file://")).read_text()


def test_a_volume_shows_the_slice_of_largest_mask_area_as_the_models_saw_it(run):
    _, rows = run
    row = rows["vol.nii.gz"]
    views = case_views(row, JobConfig(), storage=None)
    assert [(v.label, v.slice_index) for v in views] == [("largest mask area", 3), ("middle slice", 4)]
    record = record_of(row)
    for view in views:  # exactly the model's input, and the mask in the same frame
        (model_input,) = load_chunk(record, view.slice_index, view.slice_index + 1, JobConfig(), fs=None)
        np.testing.assert_array_equal(view.image, model_input)
        grey = view.image[..., 0].astype(float)
        assert view.mask.any() and grey[view.mask].mean() > grey[~view.mask].mean() + 100
    display = to_display(read_mask(row["mask_uri"], None), record)
    np.testing.assert_array_equal(views[0].mask, plane(display, 3, 2) > 0)
    assert views[0].image.shape[:2] == (16, 20)  # the display grid: H along j, W along i (stored RAS, shown LPS)
    assert not np.array_equal(display, read_mask(row["mask_uri"], None))  # the display flip is not a no-op here
    # a 2D image: its one slice
    assert [(v.label, v.slice_index) for v in case_views(rows["img01.png"], JobConfig(), storage=None)] == [
        ("image", 0)
    ]


def test_slices_to_show_and_thumbnails():
    mask = np.zeros((4, 5, 9), bool)
    assert slices_to_show(mask, 2) == [("middle slice", 4)]
    mask[1, 1, 7] = mask[1, 2, 7] = mask[2, 2, 2] = True
    assert slices_to_show(mask, 2) == [("largest mask area", 7), ("middle slice", 4)]
    assert slices_to_show(mask, 0) == [("largest mask area", 1), ("middle slice", 2)]
    assert slices_to_show(np.ones((4, 5, 1), bool), 2) == [("image", 0)]
    assert thumbnail_size(30, 40) == (144, 192) and thumbnail_size(1000, 10) == (192, 2)
    image = np.zeros((30, 40, 3), np.uint8)
    square = np.zeros((30, 40), bool)
    square[10:20, 10:30] = True
    picture = thumbnail(image, square)
    assert picture.shape == (144, 192, 3)
    green = np.all(picture == (0, 255, 0), axis=2)
    assert green.any() and not green[72, 96] and not green[0, 0]  # a contour, not a fill


def test_pick_takes_outliers_then_a_seeded_sample():
    n = 50
    rng = np.random.default_rng(0)
    voxels = rng.integers(900, 1100, n).astype(float)
    voxels[[3, 4]] = 0  # empty
    voxels[10] = 100_000  # far larger than the rest
    sam = rng.uniform(0.6, 0.9, n)
    sam[20] = 0.05
    table = pa.table({
        "case_id": [f"c{i:03d}" for i in range(n)], "target": ["t"] * n,
        "status": ["ok"] * (n - 2) + ["failed"] * 2, "mask_voxels": voxels, "mask_volume_ml": [None] * n,
        "sam_score_mean": sam, "saliency_mean": [0.1] * n, "saliency_max": [0.5] * n, "uncertainty": [None] * n,
    })  # fmt: skip
    picks = pick(table, sample=5, per_outlier=1, seed=3)
    why = {p.case_id: p.why for p in picks}
    assert why["c010"][0] == "large for its target" and why["c020"] == [LOW_SAM]
    assert sum(EMPTY in w for w in why.values()) == 1 and {"c003", "c004"} & set(why)
    assert sum(SMALLEST in w for w in why.values()) == 1
    sampled = [p.case_id for p in picks if p.why == [SAMPLE]]
    assert len(sampled) == 5 and not {"c048", "c049"} & set(sampled)  # failed pairs are never sampled
    assert sampled == [p.case_id for p in pick(table, sample=5, per_outlier=1, seed=3) if p.why == [SAMPLE]]
    assert sampled != [p.case_id for p in pick(table, sample=5, per_outlier=1, seed=4) if p.why == [SAMPLE]]


def test_the_command_writes_the_report_and_refuses_an_out_without_a_catalog(run, tmp_path, capsys):
    out, _ = run
    assert main(["report", str(out), "--sample", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "written to file://" in printed and "/qc/report-" in printed
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no catalog here" in err[0]


def test_the_report_of_an_s3_out(tmp_path: Path, s3_bucket, s3_server):
    bucket, fs = s3_bucket
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    rows = write_run(write_inputs(tmp_path), f"s3://{bucket}/out", storage=storage)
    summary = write_report(f"s3://{bucket}/out", storage=storage, sample=2)
    assert summary.uri.startswith(f"s3://{bucket}/out/qc/report-")
    page = Page(fs.cat_file(summary.uri).decode())
    assert page.sections == SECTIONS and summary.thumbnails > 0
    assert {c for _, c, _ in page.figures} <= {r["case_id"] for r in rows.values()}
    assert all(not s.problem for s in summary.shown)  # masks read from S3, sources from local disk


@pytest.mark.usefixtures("ray_local")
def test_the_report_of_a_real_job_with_tiny_models(tmp_path: Path, capsys):
    """A real job (tiny models) over PNGs, a DICOM series and a NIfTI, then `mcs-batch report`."""
    import json

    from mcs_batch.config import load_config
    from mcs_batch.pipeline import run_job
    from mcs_batch.query import query

    src = write_inputs(tmp_path)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # fails before any model sees it
    out = tmp_path / "out"
    cfg = load_config(preset="tiny", prompts=["a bright lesion"], target=TARGET, overrides=[
        f"inputs.uris={json.dumps([str(src)])}", f"outputs.uri={json.dumps(str(out))}",
        f"models.cache_dir={tmp_path.parent / 'model-cache'}"])  # fmt: skip
    run_job(cfg, progress=lambda message: None)
    assert main(["report", str(out)]) == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("written to ")
    page = read_report(uri)
    assert page.sections == SECTIONS
    for _, img in page.images:
        assert decode(img["src"]).size == (int(img["width"]), int(img["height"]))
    _, by_status = query(str(out), "SELECT status, count(*), count(DISTINCT case_id) FROM cases GROUP BY 1")
    table = {r[0]: [int(v.replace(",", "")) for v in r[1:]] for r in page.tables["counts"][0][1:]}
    assert all(table[s] == [n, c] for s, n, c in by_status)
    _, ids = query(str(out), "SELECT case_id, kind FROM cases WHERE status = 'ok'")
    shown = {c for _, c, _ in page.figures}
    assert shown and shown <= {c for c, _ in ids}
    assert {k for c, k in ids if c in shown} == {"image", "dicom_series", "nifti"}  # 7 ok cases: all shown
    assert by_status and {s for s, _, _ in by_status} == {"ok", "failed"}
    assert "TINY RANDOM MODELS: 8 of 8 pair(s) come from runs with tiny" in " ".join(page.text)  # the failure too
