"""Fine-tune BiomedCLIP on image-caption pairs with Ray Train; write a model folder the job loads.

    result = finetune_clip(load_finetune_config("jobs/configs/finetune_tiny.yaml"), storage=storage)
    result.output_uri      # open_clip folder: --set models.clip=<it> in a segmentation job
    result.card["metrics"] # validation retrieval per epoch, before training and at the end

Driver side: fetch the base model (its digest and image size), read the listing with Ray Data (caption
filters, hash split), decode images in Ray Data tasks, run `mcs_batch.train.loop.train_loop` on a
TorchTrainer (DDP over `run.num_workers` workers), then assemble the model folder from the last
checkpoint. Run it again with the same `run.name` and `run.storage_path` after an interruption and
it resumes from the newest checkpoint there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, join, protocol_of, ray_train_storage
from mcs_batch.models.biomedclip import CLIP_IMAGE_SIZE
from mcs_batch.models.open_clip_folder import OPEN_CLIP_CONFIG
from mcs_batch.models.weights import fetch
from mcs_batch.train.config import FinetuneConfig
from mcs_batch.train.dhn_nce import make_loss
from mcs_batch.train.loop import MODEL_FILE, STATE_FILE, train_loop
from mcs_batch.train.model_folder import check_output, write_model_folder
from mcs_batch.train.optim import steps_per_epoch
from mcs_batch.train.pairs import TRAIN, VAL, decoded, listing_digest, read_pairs, split_counts


class FinetuneError(RuntimeError):
    """Training did not finish (a worker failed or the run was interrupted); resumable."""


@dataclass(frozen=True)
class FinetuneResult:
    output_uri: str  # where the model folder is
    card: dict  # what model_card.json holds
    summary: dict  # rank 0's training summary: steps, history, base and final metrics
    checkpoint_path: str  # the last checkpoint (on run.storage_path)


def finetune_clip(
    cfg: FinetuneConfig, *, storage: StorageOptions | None = None, progress: Callable[[str], None] = print
) -> FinetuneResult:
    """Train, then write the model folder at cfg.output.uri. Ray must be reachable (ray.init or a
    cluster); ConfigError for bad inputs, FinetuneError when training fails (run again to resume)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg.check_required()
    start = time.perf_counter()
    check_output(cfg.output.uri, overwrite=cfg.output.overwrite, storage=storage)
    resume = newest_checkpoint_state(cfg, storage=storage)
    if resume is not None:
        if resume.get("config_hash") != cfg.hash():
            raise ConfigError(
                f"run.name {cfg.run.name!r} at {cfg.run.storage_path} has checkpoints of another configuration "
                f"(hash {resume.get('config_hash')}, now {cfg.hash()}): resume with the same model, data, loss "
                "and optim settings, or start a new run under another run.name"
            )
        progress(f"resuming run {cfg.run.name} from its checkpoint at step {resume.get('step')}")
    base = fetch(
        cfg.model.uri,
        cache_dir=Path(os.path.expanduser(cfg.model.cache_dir)),
        storage_options=(storage or StorageOptions()).fsspec_kwargs(protocol_of(cfg.model.uri)),
        expected={"open_clip_pytorch_model.bin": cfg.model.sha256} if cfg.model.sha256 else None,
    )
    if not base.is_folder:
        raise ConfigError(f"model.uri {cfg.model.uri}: BiomedCLIP needs an open_clip folder, got a single file")
    image_size = _image_size(base.local_path)

    pairs = read_pairs(cfg.data, storage=storage)
    counts = split_counts(pairs)
    if counts[TRAIN] < max(2, cfg.run.num_workers):
        raise ConfigError(f"data: {counts[TRAIN]} training pair(s) after filtering ({counts}); too few to train")
    listing = listing_digest(cfg.data, storage=storage)
    per_epoch = steps_per_epoch(counts[TRAIN], num_workers=cfg.run.num_workers, worker_batch_size=cfg.worker_batch_size)
    total_steps = cfg.optim.epochs * per_epoch
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    progress(
        f"{counts[TRAIN]} training and {counts[VAL]} validation pairs ({counts}); {per_epoch} steps per epoch, "
        f"{total_steps} steps in all on {cfg.run.num_workers} worker(s)"
    )
    decode_cpus = min(0.5, cfg.run.cpus_per_worker)
    train_data = decoded(pairs, TRAIN, cfg.data, image_size=image_size, storage=storage, num_cpus=decode_cpus)
    val_data = decoded(pairs, VAL, cfg.data, image_size=image_size, storage=storage, num_cpus=decode_cpus)
    val_data = val_data.materialize()  # decoded once, read by every worker at every evaluation

    storage_path, storage_filesystem = ray_train_storage(cfg.run.storage_path, storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "storage": storage, "total_steps": total_steps},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},  # and 1 GPU each with use_gpu
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets={"train": train_data, "val": val_data},
        dataset_config=ray.train.DataConfig(datasets_to_split=[TRAIN]),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train wraps worker errors (TrainingFailedError and subclasses)
        raise FinetuneError(
            f"training did not finish ({type(e).__name__}: {_first_line(e)}); run it again with the same "
            f"run.name ({cfg.run.name}) and run.storage_path to resume from the last checkpoint"
        ) from e
    summary = result.return_value or {}
    if result.checkpoint is None:
        raise FinetuneError("training finished without a checkpoint to build the model from")
    progress(f"trained {summary.get('steps')} steps; writing the model folder to {cfg.output.uri}")

    loss = make_loss(cfg.loss.kind, temperature=cfg.loss.temperature, beta1=cfg.loss.beta1, beta2=cfg.loss.beta2)
    card = {
        "format": 1,
        "base_model": {"uri": base.uri, "digest": base.digest, "files": base.files, "tiny": base.tiny},
        "data": {
            "listing": list(cfg.data.listing),
            "listing_files": listing["files"],
            "listing_digest": listing["digest"],
            "pairs": counts,
            "val_fraction": cfg.data.val_fraction,
            "split_salt": cfg.data.split_salt,
            "image_column": cfg.data.image_column,
            "caption_column": cfg.data.caption_column,
            "min_caption_chars": cfg.data.min_caption_chars,
            "min_caption_words": cfg.data.min_caption_words,
            "resize": cfg.data.resize,
        },
        "loss": loss.describe(),
        "optim": cfg.to_dict()["optim"],
        "training": {
            "steps": summary.get("steps"),
            "planned_steps": total_steps,
            "epochs_completed": summary.get("epochs_completed"),
            "resumed_from_step": summary.get("resumed_from_step"),
            "skipped_small_batches": summary.get("skipped_small_batches"),
            "workers": cfg.run.num_workers,
            "gpu": cfg.run.use_gpu,
            "run_name": cfg.run.name,
            "checkpoint": result.checkpoint.path,
        },
        "metrics": {
            "base_model": summary.get("base_metrics"),
            "final": summary.get("final_metrics"),
            "per_epoch": summary.get("history", []),
        },
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "seconds": None,
    }
    with result.checkpoint.as_directory() as folder:
        card["seconds"] = round(time.perf_counter() - start, 1)
        output_uri, card = write_model_folder(
            cfg.output.uri,
            base_folder=base.local_path,
            weights_file=Path(folder) / MODEL_FILE,
            card=card,
            overwrite=cfg.output.overwrite,
            storage=storage,
        )
    return FinetuneResult(output_uri=output_uri, card=card, summary=summary, checkpoint_path=result.checkpoint.path)


def newest_checkpoint_state(cfg: FinetuneConfig, *, storage: StorageOptions | None = None) -> dict | None:
    """state.json of the newest checkpoint of this run name on its storage path (None: a new run).

    Checkpoint folders are named checkpoint_<step, 8 digits>[_final], so the last name is the newest.
    """
    fs, root = filesystem_for(join(cfg.run.storage_path, cfg.run.name), storage)
    try:
        fs.invalidate_cache(root)
        states = sorted(fs.glob(f"{root.rstrip('/')}/checkpoint_*/{STATE_FILE}"))
        return json.loads(fs.cat_file(states[-1])) if states else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"run.storage_path {cfg.run.storage_path}: cannot read its checkpoints ({e})") from e


def _image_size(folder: Path) -> int:
    try:
        config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        return int(config["model_cfg"]["vision_cfg"].get("image_size", CLIP_IMAGE_SIZE))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder}: no readable {OPEN_CLIP_CONFIG} ({e})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
