"""The Ray Train worker: one nnU-Net ensemble member per worker, cyclic learning rate, resume.

`member_loop(config)` runs on every worker of a TorchTrainer (`mcs_batch.train.weak.train` starts it):

    setup     nnU-Net's environment for a node-local scratch folder (nnunet_env), the files of the
              preprocessed dataset this configuration trains on in the node's cache (worker_data: one
              download per node, parallel transfers), the trainer class found by name (nnUNet_extTrainer),
              built for this worker's device and detached from Ray Train's process group (members
              are independent: worker r trains with seed + r on every pseudo-label)
    epoch     nnU-Net's own train / validation steps; the learning rate of epoch e is
              schedule.cyclic_lr(e); the last M epochs of each cycle write their weights to
              WORK/ensemble/<member>_<cycle>_<epoch>.pt (state dict only)
    report    every run.checkpoint_every_epochs epochs and after the last: a Ray Train checkpoint with
              member_<r>/{model.pt, optimizer.pt, state.json} from every worker; nnU-Net's text log
              to WORK/logs/member_<r>_from_epoch<e>.txt (and what it downloaded: member_<r>_transfer.json)
    resume    ray.train.get_checkpoint(): weights, optimizer and the epoch counter come back, and
              training goes on from the next epoch (tensors loaded with weights_only=True)
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path

from mcs_batch.faults import fire_once
from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.train.weak.config import WeakConfig
from mcs_batch.train.weak.files import write_bytes
from mcs_batch.train.weak.nnunet_env import PREPROCESSED, NnunetStage, nnunet_environment, use_nnunet_environment
from mcs_batch.train.weak.schedule import cyclic_lr, is_kept, member_name
from mcs_batch.train.weak.worker_data import cache_folder, fetch_preprocessed

logger = logging.getLogger(__name__)

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.pt", "optimizer.pt", "state.json"
FOLD = "all"


class SimulatedInterruption(RuntimeError):
    """Raised by the testing hook `testing.interrupt_after_step` (an epoch here); never in a real run."""


def ensemble_folder(cfg: WeakConfig) -> str:
    return join(cfg.work, "ensemble")


def transfer_record(cfg: WeakConfig, rank: int) -> str:
    return join(cfg.work, "logs", f"member_{rank:02d}_transfer.json")


def preprocessed_folder(cfg: WeakConfig) -> str:
    return join(cfg.work, PREPROCESSED, cfg.dataset_name)


def member_loop(config: dict) -> dict:
    """Ray Train entry. config: {"cfg": WeakConfig, "storage": StorageOptions | None, "config_hash": str,
    "identity": the training's (identity.py; keys the node cache), "configuration": "2d" | "3d_fullres"
    (resolved), "augmentation_processes": nnUNet_n_proc_DA (resources.py)}. What this worker downloaded
    goes to WORK/logs/member_<r>_transfer.json (files.TransferReport; Ray Train returns rank 0's value only)."""
    import ray.train

    cfg: WeakConfig = config["cfg"]
    storage: StorageOptions | None = config["storage"]
    rank = ray.train.get_context().get_world_rank()
    scratch = Path(tempfile.mkdtemp(prefix=f"mcs-weak-{rank}-", dir=cfg.run.scratch_dir or None))
    configuration = config.get("configuration", "2d")
    try:
        identity = config.get("identity", config["config_hash"])
        cache = cache_folder(cfg.run.scratch_dir, cfg.work, identity, configuration)
        env = nnunet_environment(scratch, stage=NnunetStage.TRAIN, n_proc_da=config.get("augmentation_processes", 0),
                                 preprocessed=cache / PREPROCESSED)  # fmt: skip
        use_nnunet_environment(env)
        dataset = Path(env[PREPROCESSED]) / cfg.dataset_name
        transfer = fetch_preprocessed(preprocessed_folder(cfg), dataset, storage, plans_name=cfg.train.plans,
                                      configuration=configuration,
                                      connections=cfg.run.transfer_connections)  # fmt: skip
        logger.info("member %d: %d preprocessed file(s) in the node cache, %d downloaded (%d bytes, %.1f s)", rank,
                    transfer.files, transfer.transferred, transfer.bytes, transfer.seconds)  # fmt: skip
        write_bytes(transfer_record(cfg, rank), json.dumps({"member": rank, **transfer.to_dict()}).encode(), storage)
        return _train_member(cfg, storage, rank, dataset, config["config_hash"], configuration)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_trainer(cfg: WeakConfig, preprocessed: Path, device, configuration: str = "2d"):
    """The configured trainer class (found by nnU-Net, with nnUNet_extTrainer), for one member of
    nnU-Net's `configuration` ("2d" or "3d_fullres", as planned)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from mcs_batch.train.weak.nnunet_ext.nnUNetTrainer_McsBatch import detach_from_process_group

    plans = load_json(str(preprocessed / f"{cfg.train.plans}.json"))
    plans["continue_training"] = False  # popped by the trainer; we resume ourselves
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    trainer_class = recursive_find_trainer_class_by_name(cfg.train.trainer)
    trainer = trainer_class(plans, configuration, FOLD, dataset_json, device=device)
    detach_from_process_group(trainer, device)
    trainer.num_iterations_per_epoch = cfg.train.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = cfg.train.val_iterations_per_epoch
    trainer.num_epochs = cfg.train.total_epochs
    trainer.initial_lr = cfg.train.lr
    trainer.disable_checkpointing = True  # checkpoints are ours (Ray Train + the ensemble folder)
    return trainer


def _train_member(cfg: WeakConfig, storage, rank: int, preprocessed: Path, config_hash: str,
                  configuration: str) -> dict:  # fmt: skip
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    seed = cfg.train.seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    trainer = build_trainer(cfg, preprocessed, device, configuration)
    trainer.on_train_start()
    start_epoch, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            member = Path(folder) / f"member_{rank:02d}"
            if not member.is_dir():
                raise ValueError(f"checkpoint {checkpoint.path} has no member_{rank:02d}: resume with the same "
                                 "run.num_workers, or start a new run under another run.name")  # fmt: skip
            state = json.loads((member / STATE_FILE).read_text())
            if state.get("config_hash") != config_hash:
                raise ValueError(f"checkpoint {checkpoint.path} is of another configuration "
                                 f"({state.get('config_hash')}, now {config_hash})")  # fmt: skip
            trainer.network.load_state_dict(torch.load(member / MODEL_FILE, map_location=device, weights_only=True))
            trainer.optimizer.load_state_dict(torch.load(member / OPTIMIZER_FILE, map_location=device,
                                                         weights_only=True))  # fmt: skip
            if state.get("nnunet_log"):
                trainer.logger.load_checkpoint(state["nnunet_log"])  # its EMA pseudo Dice goes on from here
            start_epoch = resumed_from = int(state["epoch"])
        logger.info("member %d: resumed at epoch %d", rank, start_epoch)
        resumed_seed = seed * 100_003 + start_epoch  # fresh draws, not a replay of the first epochs' augmentation
        torch.manual_seed(resumed_seed)
        np.random.seed(resumed_seed % 2**32)
        random.seed(resumed_seed)
    history = []
    total = cfg.train.total_epochs
    for epoch in range(start_epoch, total):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        lr = cyclic_lr(epoch, cfg.train)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(cfg.train.iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            n_val = cfg.train.val_iterations_per_epoch
            val = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(n_val)]
            trainer.on_validation_epoch_end(val)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(trainer.logger.get_value("train_losses", step=-1)),
            "val_loss": float(trainer.logger.get_value("val_losses", step=-1)),
            "pseudo_dice": float(trainer.logger.get_value("mean_fg_dice", step=-1)),
            "kept": is_kept(epoch, cfg.train),
        }
        history.append(record)
        weights = {k: v.detach().cpu() for k, v in trainer.network.state_dict().items()}
        if record["kept"]:
            buffer = io.BytesIO()
            torch.save(weights, buffer)
            write_bytes(join(ensemble_folder(cfg), f"{member_name(rank, epoch, cfg.train)}.pt"), buffer.getvalue(),
                        storage)  # fmt: skip
        if (epoch + 1) % cfg.run.checkpoint_every_epochs == 0 or epoch + 1 == total:
            _upload_log(cfg, storage, trainer, rank, start_epoch)
            _report(record, weights, trainer, rank, epoch + 1, config_hash)
            _maybe_interrupt(cfg, epoch + 1, rank)
    summary = {"member": rank, "epochs": total, "resumed_from_epoch": resumed_from, "history": history,
               "mirroring_axes": list(trainer.inference_allowed_mirroring_axes or ())}  # fmt: skip
    try:
        trainer.on_train_end()  # shuts nnU-Net's data loaders down (its own checkpointing is off)
    except Exception as e:  # its final bookkeeping must not fail a finished run
        logger.warning("member %d: nnU-Net on_train_end: %s", rank, e)
    return summary


def _upload_log(cfg: WeakConfig, storage, trainer, rank: int, start_epoch: int) -> None:
    """nnU-Net's text log of this member (this attempt) -> WORK/logs/member_<r>_from_epoch<e>.txt."""
    log = Path(trainer.log_file)
    if log.is_file():
        name = f"member_{rank:02d}_from_epoch{start_epoch:04d}.txt"
        write_bytes(join(cfg.work, "logs", name), log.read_bytes(), storage)


def _report(metrics: dict, weights: dict, trainer, rank: int, epoch: int, config_hash: str) -> None:
    """Every worker reports (a barrier); each puts its member's files into the same checkpoint folder."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        member = Path(folder) / f"member_{rank:02d}"
        member.mkdir()
        torch.save(weights, member / MODEL_FILE)
        torch.save(trainer.optimizer.state_dict(), member / OPTIMIZER_FILE)
        state = {"epoch": epoch, "config_hash": config_hash, **metrics, "nnunet_log": trainer.logger.get_checkpoint()}
        (member / STATE_FILE).write_text(json.dumps(state, default=_number))
        ray.train.report(
            {k: v for k, v in metrics.items() if isinstance(v, int | float)},
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"checkpoint_{epoch:06d}",
        )


def _number(value):
    """JSON for the numpy scalars in nnU-Net's log."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _maybe_interrupt(cfg: WeakConfig, epoch: int, rank: int) -> None:
    t = cfg.testing
    if t.interrupt_after_step and epoch == t.interrupt_after_step and rank == 0 and fire_once(t.fault_marker):
        raise SimulatedInterruption(f"testing: interrupted after the checkpoint of epoch {epoch}")
