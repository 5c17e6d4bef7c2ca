"""The weak-supervision config, the ensemble schedule, nnU-Net's environment and the trigger."""

from __future__ import annotations

import shlex

import pytest

from mcs_batch.errors import ConfigError
from mcs_batch.train.weak.config import TrainSettings, load_weak_config
from mcs_batch.train.weak.nnunet_env import EXT_TRAINER_DIR, nnunet_environment
from mcs_batch.train.weak.schedule import cyclic_lr, is_kept, kept_epochs, member_name
from mcs_batch.train.weak.trigger import submit_after_segment, train_weak_entrypoint


def test_defaults_are_the_papers_recipe_and_the_yaml_loads():
    cfg = load_weak_config("jobs/configs/train_weak.yaml", source="out", target="lesion", work="w")
    assert (cfg.train.cycles, cfg.train.keep_per_cycle, cfg.refine.threshold) == (3, 10, 0.2)
    assert cfg.refined_target == "lesion@weak" and cfg.dataset_name == "Dataset501_lesion"
    assert len(kept_epochs(cfg.train)) == 30
    changed = load_weak_config(source="out", target="lesion", work="w", overrides=["select.min_sam_score=0.7"])
    assert changed.hash() != load_weak_config(source="out", target="lesion", work="w").hash()
    same = load_weak_config(source="out", target="lesion", work="w", overrides=["run.num_workers=4"])
    assert same.hash() == load_weak_config(source="out", target="lesion", work="w").hash()  # not the model


def test_bad_values_and_missing_keys():
    with pytest.raises(ConfigError, match="keep_per_cycle"):
        load_weak_config(overrides=["train.keep_per_cycle=30"])
    with pytest.raises(ConfigError, match=r"refine\.threshold"):
        load_weak_config(overrides=["refine.threshold=1.5"])
    with pytest.raises(ConfigError, match="work must be set"):
        load_weak_config(source="out", target="lesion").check_required()
    with pytest.raises(ConfigError, match="zero-shot target"):
        load_weak_config(source="out", target="lesion@weak", work="w").check_required()


def test_cyclic_learning_rate_restarts_each_cycle_and_keeps_the_last_epochs():
    cfg = TrainSettings(cycles=3, epochs_per_cycle=4, keep_per_cycle=2, lr=0.01, min_lr_ratio=0.1)
    lrs = [cyclic_lr(e, cfg) for e in range(12)]
    assert lrs[0] == lrs[4] == lrs[8] == pytest.approx(0.01)
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] >= 0.001 and lrs[2] == pytest.approx(0.0055)
    assert [e for e in range(12) if is_kept(e, cfg)] == [2, 3, 6, 7, 10, 11]
    assert member_name(1, 6, cfg) == "member01_cycle01_epoch0006"


def test_nnunet_environment_is_made_in_one_place(tmp_path):
    plan = nnunet_environment(tmp_path, stage="plan")
    train = nnunet_environment(tmp_path, stage="train")
    assert plan["nnUNet_raw"] == str(tmp_path / "nnUNet_raw") and plan["nnUNet_extTrainer"] == str(EXT_TRAINER_DIR)
    assert "nnUNet_n_proc_DA" not in plan and train["nnUNet_n_proc_DA"] == "0"  # ENVIRONMENT.md
    assert (EXT_TRAINER_DIR / "nnUNetTrainer_McsBatch.py").is_file()


class FakeJobClient:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return "raysubmit_1"


def test_the_trigger_submits_train_weak_with_refinement():
    client = FakeJobClient()
    sid = submit_after_segment("s3://b/out dir", "lesion", "s3://b/weak", address="http://h:8265",
                               overrides=["run.num_workers=2"], client=client)  # fmt: skip
    assert sid == "raysubmit_1"
    argv = shlex.split(client.calls[0]["entrypoint"])
    assert argv[:4] == ["python", "-m", "mcs_batch.cli", "train-weak"]
    assert argv[argv.index("--from") + 1] == "s3://b/out dir" and argv[-1] == "--refine"
    assert argv[argv.index("--set") + 1] == "run.num_workers=2"
    assert "--refine" not in train_weak_entrypoint("o", "t", "w", refine=False)
