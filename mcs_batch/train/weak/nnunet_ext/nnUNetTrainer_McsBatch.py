"""nnU-Net's trainer as one ensemble member per process (found by nnU-Net through nnUNet_extTrainer).

Loaded only by nnU-Net's class finder or by the training worker, after nnunet_env has set nnU-Net's
environment. Ray Train sets up a process group on every worker; nnU-Net would take that for its own
CUDA DDP. Here each worker trains an independent member, so the trainer ignores the group, runs on the
device it is given, never compiles and draws no architecture plot. The schedule (epochs, iterations,
learning rate) is set by the worker loop from the config, not by this class.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CPU = torch.device("cpu")


class nnUNetTrainer_McsBatch(nnUNetTrainer):  # nnU-Net's naming convention
    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict, device: torch.device = CPU):
        super().__init__(plans, configuration, fold, dataset_json, device)
        detach_from_process_group(self, device)

    def _do_i_compile(self) -> bool:
        return False

    def plot_network_architecture(self) -> None:
        return None


def detach_from_process_group(trainer: nnUNetTrainer, device: torch.device) -> None:
    """Make a trainer built while a process group exists train alone on `device`."""
    trainer.is_ddp = False
    trainer.local_rank = 0
    trainer.device = device
    if device.type != "cuda":
        trainer.grad_scaler = None
