"""The one place nnU-Net's environment is made (never read at import: nnunetv2 is imported lazily,
after `use_nnunet_environment`, inside the processes that run it).

    nnUNet_raw / nnUNet_preprocessed / nnUNet_results   folders under a node-local root
    nnUNet_extTrainer                                  our trainer folder (nnunet_ext/), so that
                                                       nnU-Net finds `nnUNetTrainer_McsBatch` by name
    nnUNet_def_n_proc, nnUNet_n_proc_DA, nnUNet_compile  CPU-friendly process counts, no torch.compile

ENVIRONMENT.md: nnUNet_n_proc_DA=0 (no augmentation worker processes) must not be set while planning.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

EXT_TRAINER_DIR = Path(__file__).parent / "nnunet_ext"
RAW, PREPROCESSED, RESULTS = "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"


class NnunetStage(StrEnum):
    PLAN = "plan"  # fingerprint, plans, preprocessing
    TRAIN = "train"
    PREDICT = "predict"


def nnunet_environment(root: str | Path, *, stage: NnunetStage | str, n_proc: int = 1, n_proc_da: int = 0,
                       preprocessed: str | Path | None = None) -> dict:  # fmt: skip
    """Environment variables for nnU-Net working under `root` (a node-local folder) at `stage`;
    `preprocessed`: nnUNet_preprocessed elsewhere (a training worker's node cache, worker_data.py)."""
    stage = NnunetStage(stage)
    root = Path(root)
    env = {
        RAW: str(root / RAW),
        PREPROCESSED: str(preprocessed or root / PREPROCESSED),
        RESULTS: str(root / RESULTS),
        "nnUNet_extTrainer": str(EXT_TRAINER_DIR),
        "nnUNet_def_n_proc": str(max(1, n_proc)),
        "nnUNet_compile": "false",
    }
    if stage != NnunetStage.PLAN:
        env["nnUNet_n_proc_DA"] = str(max(0, n_proc_da))
    return env


def use_nnunet_environment(env: dict) -> None:
    """Put `env` into this process's environment (call before the first nnunetv2 import in it)."""
    for name in (RAW, PREPROCESSED, RESULTS):
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
