"""`reproduce`'s weakly supervised row: its table beside the paper's numbers, what it says without the
training split, and (slow) the whole row on a stand-in with tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mcs_batch.cli import main
from mcs_batch.eval.datasets import PAPER_DATASETS, paper_dataset
from mcs_batch.eval.evaluate import EvaluationResult, read_evaluation
from mcs_batch.eval.reproduce import ReproduceReport, ReproduceRun, job_config, run_weak, weak_lines, zero_shot_lines
from tests.eval.cohort import blob_image, save_png
from tests.eval.cohort import paper_dataset as write_paper_dataset

CONFIGS = Path(__file__).resolve().parents[3] / "jobs" / "configs"


def result(dice: float, nsd: float) -> EvaluationResult:
    rows = [{"status": "ok", "dice": dice, "nsd": nsd, "hd95": 1.0, "unit": "px", "tolerance": 2.0}] * 2
    return EvaluationResult(dataset="d", target="t@weak", rows=rows, unmatched_predictions=0)


def test_weak_table_beside_the_papers_weakly_supervised_numbers():
    report = ReproduceReport()
    for d, dice in zip(PAPER_DATASETS, (0.8, 0.7, 0.6, 0.9), strict=True):
        report.runs.append(ReproduceRun(d, "full", "/o", result(0.5, 0.5)))
        report.runs.append(ReproduceRun(d, "weak", "/o", result(dice, 0.8)))
    lines = weak_lines(report)
    assert lines[2].split() == ["Breast", "US", "2", "80.00", "78.87", "+1.13", "80.00", "84.58", "-4.58"]
    assert lines[6].split() == ["Mean", "75.00", "82.11", "-7.11", "80.00", "87.33", "-7.33"]
    assert zero_shot_lines(report)[-len(lines) :] == lines  # printed after the zero-shot table
    assert not any("Weakly" in x for x in zero_shot_lines(ReproduceReport(runs=report.runs[::2])))


def test_without_train_images_the_row_says_what_is_missing(tmp_path: Path):
    folder = write_paper_dataset(tmp_path / "data", "breast_tumors", 1, seed=0)
    cfg = job_config(paper_dataset("breast_us"), configs_dir=CONFIGS, models="tiny", sam="vit_b",
                     images=str(folder / "test_images"), out=str(tmp_path / "o" / "breast_us" / "full"),
                     ablation="full")  # fmt: skip
    said = []
    assert run_weak(paper_dataset("breast_us"), cfg, str(folder), run_job=None, progress=said.append) is None
    assert len(said) == 1 and said[0].startswith("Breast US: weakly supervised row skipped: it needs the training")
    assert f"{folder / 'train_images'}/" in said[0]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_reproduce_runs_the_weak_row_where_the_training_split_is_present(tmp_path: Path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    folder = write_paper_dataset(data, "breast_tumors", 2, seed=1, mask_suffix="_mask")
    rng = np.random.default_rng(9)
    for i in range(6):
        save_png(folder / "train_images" / f"train{i}.png", blob_image(rng, 48, 48)[0])
    cache = f"models.cache_dir={tmp_path.parent / 'model-cache'}"
    code = main(["reproduce", "--data", str(data), "--models", "tiny", "--out", str(out), "--set", cache,
                 "--datasets", "breast_us"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = printed.splitlines()
    table = lines[next(i for i, x in enumerate(lines) if x.startswith("Weakly supervised")) :]
    (line,) = [x for x in table if x.strip().startswith("Breast")]
    rows = [r for r in read_evaluation(str(out / "breast_us" / "full")).to_pylist() if r["target"].endswith("@weak")]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert float(line.split()[3]) == pytest.approx(100 * np.mean([r["dice"] for r in rows]), abs=0.006)
    assert float(line.split()[4]) == 78.87
