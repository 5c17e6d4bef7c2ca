"""Frozen fine-tuning configuration: every number visible, one way to override it.

Built like the segmentation job's config, by mcs_batch.yaml_config: defaults below <- a YAML file <- `--set
a.b=value` overrides (YAML scalars). Unknown keys and bad values raise ConfigError naming the key.

    cfg = load_finetune_config("jobs/configs/finetune_tiny.yaml", overrides=["optim.lr=1e-4"])
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from mcs_batch.errors import ConfigError
from mcs_batch.faults import TestingConfig
from mcs_batch.io.window import WindowSettings
from mcs_batch.models.settings import ResizeMode
from mcs_batch.yaml_config import load, to_plain


class LossKind(StrEnum):
    DHN_NCE = "dhn_nce"
    HN_NCE = "hn_nce"
    DCL = "dcl"
    INFONCE = "infonce"


class Towers(StrEnum):
    """Which parameters fine-tuning trains."""

    BOTH = "both"
    VISION = "vision"
    TEXT = "text"
    PROJECTION = "projection"  # the two projection heads only


class ListingFormat(StrEnum):
    AUTO = "auto"  # by file extension
    PARQUET = "parquet"
    CSV = "csv"
    JSONL = "jsonl"


@dataclass(frozen=True)
class BaseModelConfig:
    """The model to start from: a BiomedCLIP open_clip folder by URI (see models/weights.py)."""

    uri: str = "tiny"  # hf-hub:..., s3://bucket/prefix/, /path, or "tiny" (random weights, tests only)
    sha256: str | None = None  # pin of its open_clip_pytorch_model.bin
    cache_dir: str = "~/.cache/mcs-batch/models"  # per-node cache for remote weights


@dataclass(frozen=True)
class PairsConfig:
    """Image-caption pairs: a listing (Parquet / CSV / JSONL) of image URIs and captions."""

    listing: tuple[str, ...] = ()  # listing files (or folders of them): /path, s3://bucket/key, ...
    format: ListingFormat = ListingFormat.AUTO  # auto (by file extension) | parquet | csv | jsonl
    image_column: str = "image"  # image URI; relative paths are relative to the listing's folder
    caption_column: str = "caption"
    min_caption_chars: int = 8  # captions shorter than this (after trimming whitespace) are dropped
    min_caption_words: int = 2  # ... and captions with fewer words
    val_fraction: float = 0.1  # share of images in the validation split (by a stable hash of the URI)
    split_salt: str = "mcs-batch-v1"  # part of the hash: another salt draws another split
    resize: ResizeMode = ResizeMode.RESIZE  # CLIP geometry as in the segmentation job: resize | pad
    window: WindowSettings = field(default_factory=WindowSettings)  # DICOM -> RGB, as in the job
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer; 0 = listing order

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.min_caption_chars < 0 or self.min_caption_words < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data: min_caption_chars, min_caption_words and shuffle_buffer must be >= 0")


@dataclass(frozen=True)
class LossConfig:
    """The contrastive loss (mcs_batch.train.dhn_nce); METHOD.md's defaults."""

    kind: LossKind = LossKind.DHN_NCE  # dhn_nce (the method) | hn_nce | dcl | infonce
    temperature: float = 0.6  # tau
    beta1: float = 0.15  # hard-negative weighting, image -> text
    beta2: float = 0.15  # hard-negative weighting, text -> image

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature: must be > 0, got {self.temperature}")
        if self.beta1 < 0 or self.beta2 < 0:
            raise ConfigError("loss.beta1 / loss.beta2: must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, per optimizer step."""

    batch_size: int = 64  # global pairs per step (the loss's B), split evenly over the workers
    epochs: int = 10
    max_steps: int = 0  # > 0: stop after this many steps (and size the schedule to it)
    lr: float = 1e-5  # peak learning rate, reached after warm-up
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear from 0 to lr
    weight_decay: float = 0.1  # AdamW, on weights of 2+ dimensions only (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip_norm: float = 1.0  # max L2 norm of all trainable gradients; 0 = no clipping
    towers: Towers = Towers.BOTH  # both | vision | text | projection (the two projection heads only)
    amp: bool = True  # bf16 autocast on GPU workers (CPU workers run fp32)
    seed: int = 0  # model-side randomness (dropout) and data shuffling derive from it

    def __post_init__(self):
        if self.batch_size < 2:
            raise ConfigError(f"optim.batch_size: a contrastive batch needs >= 2 pairs, got {self.batch_size}")
        if self.epochs < 1 or self.max_steps < 0 or self.warmup_steps < 0:
            raise ConfigError("optim: epochs must be >= 1, max_steps and warmup_steps >= 0")
        if not self.lr > 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ConfigError("optim: lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, grad_clip_norm >= 0")


@dataclass(frozen=True)
class RunSettings:
    """Where checkpoints go and how the run is spread over the cluster (does not change the model)."""

    name: str = "finetune-biomedclip"  # checkpoints under storage_path/name; the same name resumes
    storage_path: str = ""  # local folder or s3://bucket/prefix for checkpoints (required)
    checkpoint_every_steps: int = 100  # and always at the last step
    keep_checkpoints: int = 2  # the newest ones kept on storage
    num_workers: int = 2  # Ray Train workers (DDP processes)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker failures Ray Train recovers from the last checkpoint within a run
    eval_batch_size: int = 64  # validation pairs per forward pass
    eval_before_training: bool = True  # also evaluate the base model (epoch 0 in the history)

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"run.name: {self.name!r} must be letters, digits, '-', '_' or '.'")
        if self.checkpoint_every_steps < 1 or self.keep_checkpoints < 1 or self.num_workers < 1:
            raise ConfigError("run: checkpoint_every_steps, keep_checkpoints and num_workers must be >= 1")
        if self.eval_batch_size < 1 or self.max_failures < 0:
            raise ConfigError("run: eval_batch_size must be >= 1 and max_failures >= 0")


@dataclass(frozen=True)
class OutputConfig:
    uri: str = ""  # the fine-tuned model folder: local path or s3://bucket/prefix (required)
    overwrite: bool = False  # replace an existing model folder there


@dataclass(frozen=True)
class FinetuneConfig:
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: PairsConfig = field(default_factory=PairsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSettings = field(default_factory=RunSettings)
    output: OutputConfig = field(default_factory=OutputConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)

    def __post_init__(self):
        if self.optim.batch_size % self.run.num_workers:
            raise ConfigError(
                f"optim.batch_size {self.optim.batch_size} must be a multiple of run.num_workers {self.run.num_workers}"
            )
        if self.optim.batch_size // self.run.num_workers < 1:
            raise ConfigError("optim.batch_size: at least one pair per worker")

    @property
    def worker_batch_size(self) -> int:
        return self.optim.batch_size // self.run.num_workers

    def to_dict(self) -> dict:
        return to_plain(self)

    def hash(self) -> str:
        """sha256 (16 hex) of what determines the model: base, data, loss, optimisation."""
        method = {k: v for k, v in self.to_dict().items() if k in ("model", "data", "loss", "optim")}
        method["model"] = {k: v for k, v in method["model"].items() if k != "cache_dir"}
        blob = json.dumps(method, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_required(self) -> None:
        """The keys a run cannot do without (checked before any work starts)."""
        missing = [
            key
            for key, value in (
                ("data.listing", self.data.listing),
                ("run.storage_path", self.run.storage_path),
                ("output.uri", self.output.uri),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"finetune config: {', '.join(missing)} must be set (in the YAML file or with --set)")


def load_finetune_config(path: str | Path | None = None, *, overrides: list[str] | tuple[str, ...] = ()):
    """Defaults <- YAML file <- `--set key=value` overrides, validated."""
    return load(FinetuneConfig, path, overrides=overrides)
