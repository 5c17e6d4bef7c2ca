"""`reproduce` without running jobs: the job each task gets, missing weights, and the tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcs_batch.config import BIOMEDCLIP_HF
from mcs_batch.errors import ConfigError
from mcs_batch.eval.datasets import PAPER_DATASETS, find_dataset_folder, paper_dataset
from mcs_batch.eval.evaluate import EvaluationResult
from mcs_batch.eval.reproduce import (
    SAM_CHECKPOINTS,
    ReproduceReport,
    ReproduceRun,
    ablation_lines,
    default_configs_dir,
    job_config,
    missing_weights,
    plan_runs,
    settings_lines,
    zero_shot_lines,
)
from tests.eval.cohort import paper_dataset as write_paper_dataset

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_each_task_gets_its_job_file_with_the_paper_settings(tmp_path: Path):
    assert default_configs_dir() == CONFIGS
    brain = paper_dataset("brain_mri")
    cfg = job_config(brain, configs_dir=CONFIGS, models="real", sam="vit_h", images="/d/test_images",
                     out="/o/brain_mri/full", ablation="full")  # fmt: skip
    assert (cfg.m2ib.beta, cfg.targets[0].name, cfg.models.clip) == (2.0, "brain_tumour", BIOMEDCLIP_HF)
    assert (cfg.models.sam, cfg.models.sam_variant) == (SAM_CHECKPOINTS["vit_h"], "vit_h")  # the paper's SAM
    assert cfg.inputs.uris == ("/d/test_images",) and cfg.outputs.uri == "/o/brain_mri/full"
    lungs = job_config(paper_dataset("lung_ct"), configs_dir=CONFIGS, models="tiny", sam="vit_b", images="/i",
                       out="/o", ablation="components", overrides=["seed=3"])  # fmt: skip
    assert lungs.models.tiny and lungs.m2ib.layer == 4 and lungs.ablation == "components" and lungs.seed == 3
    assert lungs.targets[0].coarse.k_components == 2 and lungs.window.ct_window == "lung"
    with pytest.raises(ConfigError, match="ablation"):
        job_config(brain, configs_dir=CONFIGS, models="tiny", sam="vit_b", images="/i", out="/o", ablation="nnunet")


def test_dataset_folders_are_found_in_any_case_and_need_both_splits(tmp_path: Path):
    write_paper_dataset(tmp_path, "BRAIN_TUMORS", 1, seed=0)
    (tmp_path / "lung_xray" / "test_images").mkdir(parents=True)
    assert find_dataset_folder(str(tmp_path), paper_dataset("brain_mri")).endswith("/BRAIN_TUMORS")
    assert find_dataset_folder(str(tmp_path), paper_dataset("lung_xray")) is None  # no test_masks/
    assert find_dataset_folder(str(tmp_path / "nothing"), paper_dataset("lung_ct")) is None


def test_missing_weights_are_named_with_where_they_go(tmp_path: Path):
    cfg = job_config(paper_dataset("lung_xray"), configs_dir=CONFIGS, models="real", sam="vit_b", images="/i",
                     out="/o", ablation="full", overrides=[f"models.clip={tmp_path / 'no-such-clip'}",
                                                           f"models.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    (line, *_) = missing_weights([cfg])
    assert f"models.clip={tmp_path / 'no-such-clip'}: not available" in line and "weights fetch" in line
    write_paper_dataset(tmp_path / "data", "lung_xray", 1, seed=0)
    _, missing = plan_runs(str(tmp_path / "data"), str(tmp_path / "o"), datasets=[paper_dataset("lung_xray")],
                           ablations=["full"], configs_dir=CONFIGS, models="real", sam="vit_b",
                           overrides=[f"models.clip={tmp_path / 'no-such-clip'}",
                                      f"models.sam={tmp_path / 'no-such-sam.pth'}"])  # fmt: skip
    assert missing[0] == "  model weights:" and len(missing) == 3


def result(name: str, dice: list[float], nsd: list[float]) -> EvaluationResult:
    rows = [{"status": "ok", "dice": d, "nsd": n, "hd95": 1.0, "unit": "px", "tolerance": 2.0}
            for d, n in zip(dice, nsd, strict=True)]  # fmt: skip
    return EvaluationResult(dataset=name, target="t", rows=rows, unmatched_predictions=0)


def test_tables_put_ours_beside_the_paper_row_by_row():
    report = ReproduceReport()
    for d, dice in zip(PAPER_DATASETS, (0.8, 0.7, 0.6, 0.9), strict=True):
        report.runs.append(ReproduceRun(d, "full", "/o", result(d.name, [dice, dice], [0.5, 0.7])))
        report.runs.append(ReproduceRun(d, "saliency", "/o", result(d.name, [0.4], [0.3])))
    lines = zero_shot_lines(report)
    assert lines[2].split() == ["Breast", "US", "2", "80.00", "77.76", "+2.24", "60.00", "81.11", "-21.11"]
    assert lines[5].split() == ["Lung", "CT", "2", "90.00", "80.38", "+9.62", "60.00", "82.03", "-22.03"]
    assert lines[6].split() == ["Mean", "75.00", "77.61", "-2.61", "60.00", "81.56", "-21.56"]
    ablation = ablation_lines(report)
    assert ablation[2].split()[:4] == ["saliency", "40.00", "46.23", "-6.23"]
    assert ablation[3].split()[:4] == ["full", "75.00", "77.61", "-2.61"]
    cfg = job_config(paper_dataset("lung_ct"), configs_dir=CONFIGS, models="real", sam="vit_b", images="/i",
                     out="/o", ablation="full")  # fmt: skip
    notes = "\n".join(settings_lines([cfg]))
    assert "SAM vit_h there" in notes and "DHN-NCE" in notes and "boundary NSD" in notes
