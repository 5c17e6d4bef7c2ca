"""The Ray Train worker: DDP fine-tuning of BiomedCLIP with a contrastive loss, checkpoints, resume.

`train_loop(config)` runs on every worker of a TorchTrainer (`mcs_batch.train.finetune` starts it):

    model     the base BiomedCLIP, fetched once per node, chosen towers trainable, wrapped in DDP
    data      the "train" dataset shard (Ray Train's equal split) and the whole "val" dataset
    step      global batch = the workers' batches together; the loss gathers embeddings across
              workers (negatives span the global batch); AdamW, warm-up + cosine, gradient clipping,
              bf16 autocast on GPU
    report    every `checkpoint_every_steps` steps: metrics + a checkpoint (rank 0 writes it);
              every epoch: validation retrieval metrics; at the end: a final checkpoint and metrics
    resume    `ray.train.get_checkpoint()` (the newest checkpoint of this run name and storage path):
              model, optimizer, schedule and counters are restored; the interrupted epoch goes on
              from its next batch (Ray Data does not replay the same order across runs, so it skips
              as many batches as were done rather than the very same ones)

Checkpoint folder (storage_path/name/checkpoint_<step>, the last one checkpoint_<step>_final):
    model.pt          the open_clip state dict (CPU tensors): the fine-tuned model's weights file
    train_state.pt    optimizer and scheduler state
    state.json        step, epoch, batches done in the epoch, metrics history, finished
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcs_batch.faults import fire_once
from mcs_batch.io.storage import StorageOptions, protocol_of
from mcs_batch.train.config import FinetuneConfig
from mcs_batch.train.dhn_nce import make_loss
from mcs_batch.train.optim import lr_factor, parameter_groups, select_trainable, set_train_mode
from mcs_batch.train.pairs import normalise_pixels
from mcs_batch.train.retrieval import retrieval_metrics

logger = logging.getLogger(__name__)

MODEL_FILE, TRAIN_STATE_FILE, STATE_FILE = "model.pt", "train_state.pt", "state.json"


class SimulatedInterruption(RuntimeError):
    """Raised by the testing hook `testing.interrupt_after_step` (never in a real run)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch in progress (1-based)
    batches_done: int = 0  # batches of that epoch already trained on
    epoch_losses: list = field(default_factory=list)  # loss of each step of that epoch so far
    epoch_pairs: int = 0  # pairs (all workers) trained on in that epoch so far
    history: list = field(default_factory=list)  # per-epoch records (epoch 0: before training)
    finished: bool = False
    resumed_from_step: int | None = None
    config_hash: str = ""  # FinetuneConfig.hash() of the run that wrote the checkpoint
    skipped_small_batches: int = 0  # global batches of < 2 pairs (no negatives): no step taken


def train_loop(config: dict) -> dict:
    """Ray Train entry. config: {"cfg": FinetuneConfig, "storage": StorageOptions | None,
    "total_steps": int}. Returns the run summary (rank 0's becomes `Result.return_value`)."""
    import ray.train
    import ray.train.torch
    import torch

    cfg: FinetuneConfig = config["cfg"]
    storage: StorageOptions | None = config["storage"]
    total_steps = int(config["total_steps"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.optim.seed * 1009 + rank)

    clip = _load_base(cfg, storage, device)
    model = clip.model
    trainable = select_trainable(model, cfg.optim.towers)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, weight_decay=cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
    )
    schedule = _schedule(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = TrainState(config_hash=cfg.hash())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = json.loads((Path(folder) / STATE_FILE).read_text())
            if saved.get("config_hash") != cfg.hash():
                raise ValueError(
                    f"run {cfg.run.name!r} at {cfg.run.storage_path} was checkpointed with another configuration "
                    f"(hash {saved.get('config_hash')}, now {cfg.hash()}): resume with the same model, data, loss "
                    "and optim settings, or start a new run under another run.name"
                )
            state = _restore(Path(folder), model, optimizer, scheduler)
        state.resumed_from_step = state.step
        logger.info("rank %d: resumed from step %d (epoch %d)", rank, state.step, state.epoch)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    loss_fn = make_loss(cfg.loss.kind, temperature=cfg.loss.temperature, beta1=cfg.loss.beta1, beta2=cfg.loss.beta2)
    trainable_names = set(trainable)
    params = [p for n, p in model.named_parameters() if n in trainable_names]
    use_amp = cfg.optim.amp and device.type == "cuda"
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")

    def evaluate() -> dict | None:
        metrics = _evaluate(clip, val_data, rank=rank, world=world, batch_size=cfg.run.eval_batch_size, amp=use_amp)
        set_train_mode(model, cfg.optim.towers)
        return metrics

    if state.finished:
        return _summary(state, total_steps)
    if state.step == 0 and not state.history and cfg.run.eval_before_training:
        state.history.append({"epoch": 0, "step": 0, "note": "base model, before training", **(evaluate() or {})})
        ray.train.report({"epoch": 0, "step": 0, **_flat(state.history[-1])})
    set_train_mode(model, cfg.optim.towers)

    window_losses: list[float] = []
    while state.epoch <= cfg.optim.epochs and state.step < total_steps:
        batches = train_shard.iter_batches(
            batch_size=cfg.worker_batch_size,
            batch_format="numpy",
            drop_last=False,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=(cfg.optim.seed * 100_003 + state.epoch * 101 + rank)
            if cfg.data.shuffle_buffer
            else None,
        )
        for index, batch in enumerate(batches):
            if index < state.batches_done:
                continue  # trained on before the interruption (see the module docstring)
            loss, global_batch = _step(ddp, clip, batch, loss_fn, optimizer, scheduler, params, cfg, use_amp)
            state.batches_done = index + 1
            if loss is None:
                state.skipped_small_batches += 1
                continue
            state.step += 1
            state.epoch_pairs += global_batch
            state.epoch_losses.append(loss)
            window_losses.append(loss)
            if state.step % cfg.run.checkpoint_every_steps == 0 and state.step < total_steps:
                metrics = {"step": state.step, "epoch": state.epoch, "loss": _mean(window_losses)}
                metrics["lr"] = optimizer.param_groups[0]["lr"]
                _report(metrics, state, model, optimizer, scheduler, rank)
                window_losses = []
                _maybe_interrupt(cfg, state.step, rank)
            if state.step >= total_steps:
                break
        record = {"epoch": state.epoch, "step": state.step, "train_loss": _mean(state.epoch_losses)}
        record["train_pairs"] = state.epoch_pairs
        record.update(evaluate() or {})
        state.history.append(record)
        ray.train.report(_flat(record))
        state.epoch, state.batches_done, state.epoch_losses, state.epoch_pairs = state.epoch + 1, 0, [], 0

    state.finished = True
    final = {"step": state.step, "epoch": state.epoch - 1, "loss": _mean(window_losses), "final": 1}
    _report({**_flat(state.history[-1] if state.history else {}), **final}, state, model, optimizer, scheduler, rank)
    return _summary(state, total_steps)


# -- pieces --------------------------------------------------------------------------------------------


def _load_base(cfg: FinetuneConfig, storage: StorageOptions | None, device):
    from mcs_batch.models.biomedclip import load_biomedclip
    from mcs_batch.models.weights import fetch

    cache_dir = Path(os.path.expanduser(cfg.model.cache_dir))
    options = (storage or StorageOptions()).fsspec_kwargs(protocol_of(cfg.model.uri))
    pin = {"open_clip_pytorch_model.bin": cfg.model.sha256} if cfg.model.sha256 else None
    record = fetch(cfg.model.uri, cache_dir=cache_dir, storage_options=options, expected=pin)
    return load_biomedclip(record, device=str(device))


def _schedule(cfg: FinetuneConfig, total_steps: int):
    o = cfg.optim

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=o.warmup_steps, total_steps=total_steps, min_lr_ratio=o.min_lr_ratio)

    return factor


def _step(ddp, clip, batch, loss_fn, optimizer, scheduler, params, cfg: FinetuneConfig, use_amp: bool):
    """One optimizer step on this worker's part of a global batch: (loss, global batch size); the
    loss is None when the global batch has fewer than 2 pairs (all workers agree: none steps)."""
    import torch

    device = clip.device
    captions = [str(c) for c in batch["caption"]]
    global_batch = _all_reduce_int(len(captions), device)
    if global_batch < 2:
        return None, global_batch
    pixels = normalise_pixels(torch.from_numpy(batch["pixels"]).to(device), mean=clip.mean, std=clip.std)
    tokens = clip.tokenize(captions)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        outputs = ddp(pixels, tokens)
    image_features, text_features = outputs[0].float(), outputs[1].float()
    loss = loss_fn(image_features, text_features)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip_norm)
    optimizer.step()
    scheduler.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss became {value}; lower optim.lr or check the data")
    return value, global_batch


def _evaluate(clip, val_data, *, rank: int, world: int, batch_size: int, amp: bool) -> dict | None:
    """Retrieval metrics on the whole validation set; each worker embeds its share of the rows
    (by a hash of image URI + caption, so no row order needs to agree between workers)."""
    import torch
    import torch.distributed as dist

    clip.model.eval()
    device = clip.device
    mine: list[tuple[int, str, object, object]] = []
    with torch.no_grad():
        for batch in val_data.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False):
            keys = [zlib.crc32(f"{u}\n{c}".encode()) for u, c in zip(batch["image_uri"], batch["caption"], strict=True)]
            take = [i for i, key in enumerate(keys) if key % world == rank]
            if not take:
                continue
            pixels = normalise_pixels(torch.from_numpy(batch["pixels"][take]).to(device), mean=clip.mean, std=clip.std)
            captions = [str(batch["caption"][i]) for i in take]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                images = clip.model.encode_image(pixels, normalize=True).float().cpu()
                texts = clip.model.encode_text(clip.tokenize(captions), normalize=True).float().cpu()
            for j, i in enumerate(take):
                mine.append((keys[i], f"{batch['image_uri'][i]}\n{captions[j]}", images[j], texts[j]))
    everything = [mine]
    if world > 1 and dist.is_available() and dist.is_initialized():
        everything = [None] * world
        dist.all_gather_object(everything, mine)
    rows = sorted((row for part in everything for row in part), key=lambda row: (row[0], row[1]))
    if not rows:
        return None
    images = torch.stack([row[2] for row in rows])
    texts = torch.stack([row[3] for row in rows])
    captions = [row[1].split("\n", 1)[1] for row in rows]
    return retrieval_metrics(images, texts, captions)


def _all_reduce_int(value: int, device) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def _report(metrics: dict, state: TrainState, model, optimizer, scheduler, rank: int) -> None:
    """ray.train.report with a checkpoint written by rank 0 (a barrier: every worker calls it), in
    storage_path/name/checkpoint_<step, 8 digits>[_final]."""
    import ray.train
    import torch

    name = f"checkpoint_{state.step:08d}{'_final' if state.finished else ''}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="mcs-finetune-ckpt-") as folder:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        torch.save(weights, Path(folder) / MODEL_FILE)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, Path(folder) / TRAIN_STATE_FILE
        )
        (Path(folder) / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, default=float) + "\n")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def _restore(folder: Path, model, optimizer, scheduler) -> TrainState:
    import torch

    from mcs_batch.models.weights import load_state_dict

    model.load_state_dict(load_state_dict(folder / MODEL_FILE), strict=True)
    train_state = torch.load(folder / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    saved = json.loads((folder / STATE_FILE).read_text())
    saved.pop("resumed_from_step", None)
    return TrainState(**saved)


def _maybe_interrupt(cfg: FinetuneConfig, step: int, rank: int) -> None:
    t = cfg.testing
    if t.interrupt_after_step and step == t.interrupt_after_step and rank == 0 and fire_once(t.fault_marker):
        raise SimulatedInterruption(f"testing: interrupted after the checkpoint of step {step}")


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _flat(record: dict) -> dict:
    """Metrics Ray can report (numbers only)."""
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _summary(state: TrainState, total_steps: int) -> dict:
    epochs = [h for h in state.history if h.get("epoch", 0) > 0 and "train_loss" in h]
    return {
        "steps": state.step,
        "planned_steps": total_steps,
        "epochs_completed": len(epochs),
        "resumed_from_step": state.resumed_from_step,
        "skipped_small_batches": state.skipped_small_batches,
        "history": state.history,
        "base_metrics": next((h for h in state.history if h.get("epoch") == 0), None),
        "final_metrics": state.history[-1] if state.history else None,
    }
