"""Frozen configuration of weakly supervised retraining: selection, export, training, refinement.

Built like every config here (mcs_batch.yaml_config): defaults below <- a YAML file <- `--set a.b=value`.

    cfg = load_weak_config("jobs/configs/train_weak.yaml", overrides=["train.cycles=3"],
                           source="out/", target="lesion", work="s3://bucket/weak/lesion")

Paths are not read from the environment: `work` (where the selection, the nnU-Net dataset, checkpoints
and logs go) and `source` (the segmentation job's OUT) come from the command line or the YAML file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from mcs_batch.errors import ConfigError
from mcs_batch.faults import TestingConfig
from mcs_batch.yaml_config import load, to_plain

AUTO = "auto"  # resolved against the cluster when a run starts (resources.py)
WEAK_SUFFIX = "@weak"  # refined masks are committed as target "<target>@weak" (never over the zero-shot ones)


class Configuration(StrEnum):
    """nnU-Net's configuration the ensemble is trained in (`configuration` in the config)."""

    AUTO = "auto"  # 3d_fullres when every selected case is a volume, else 2d (export3d.resolve_configuration)
    TWO_D = "2d"  # the paper's: one windowed RGB PNG per slice with a mask
    THREE_D = "3d_fullres"  # whole volumes as NIfTI in physical units (HU for CT), nnU-Net's own normalisation


@dataclass(frozen=True)
class SelectionConfig:
    """Which zero-shot results become pseudo-labels. A case must pass every filter; a slice of it too.

    Agreement: the SAM mask's bounding box against the union of the saliency prompt boxes (IoU, per
    slice): the saliency maps are not stored, the boxes drawn from them are.
    """

    min_sam_score: float = 0.0  # per slice with a mask: SAM's predicted IoU >= this
    min_agreement: float = 0.0  # per slice with a mask: box IoU of mask vs saliency prompts >= this
    min_mask_pixels: int = 1  # per slice: smaller masks count as empty
    max_components: int = 0  # per case (the catalog's n_components): at most this many; 0 = no limit
    max_cases_per_dataset: int = 0  # a dataset: the first folder of a case's first key (its input); 0: no cap
    include: tuple[str, ...] = ()  # case ids: only these (empty: all)
    exclude: tuple[str, ...] = ()  # case ids never used
    keep_empty_slices: bool = False  # volumes, 2d: train on every slice of a selected case without a mask
    # volumes, 2d: else up to this many slices without a mask per slice with one, drawn per case (seeded);
    # 0: labelled slices only (then refine predicts only those: refine.slices auto). 3d_fullres trains
    # whole volumes, background included, whatever this says.
    empty_slice_ratio: float = 1.0
    max_uncertainty: float = 0.0  # > 0: drop cases an earlier ensemble found more uncertain (a second round)
    uncertainty_from: str = ""  # that round's refine tables: WORK/refine/ of the earlier run (or one .parquet)
    seed: int = 0  # which cases a per-dataset cap keeps (a stable hash of seed and case id)

    def __post_init__(self):
        if not 0.0 <= self.min_sam_score <= 1.0 or not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError("select.min_sam_score and select.min_agreement must be in [0, 1]")
        if self.min_mask_pixels < 1 or self.max_components < 0 or self.max_cases_per_dataset < 0:
            raise ConfigError("select: min_mask_pixels >= 1, max_components and max_cases_per_dataset >= 0")
        if not self.empty_slice_ratio >= 0:
            raise ConfigError(f"select.empty_slice_ratio must be >= 0, got {self.empty_slice_ratio}")
        if self.max_uncertainty < 0 or (self.max_uncertainty > 0 and not self.uncertainty_from):
            raise ConfigError("select.max_uncertainty > 0 needs select.uncertainty_from (an earlier WORK/refine/)")


@dataclass(frozen=True)
class ExportConfig:
    """The nnU-Net raw dataset: 2d, one RGB PNG per slice and a label PNG 0/1; 3d_fullres, one NIfTI
    volume per case in physical units and its label volume (0/1, 2 = ignore) in the same geometry."""

    dataset_id: int = 501  # Dataset<id>_<name>; nnU-Net wants 1..999
    dataset_name: str = ""  # default: the target's name
    # 3d_fullres: the channel's modality, which picks nnU-Net's normalisation ("CT": its CT scheme,
    # anything else its z-score). auto: the one modality the catalog gives the selected cases (NIfTI
    # headers carry none: such cases take the others'), "zscore" when there is none or several.
    modality: str = AUTO

    def __post_init__(self):
        if not 1 <= self.dataset_id <= 999:
            raise ConfigError(f"export.dataset_id: must be in 1..999, got {self.dataset_id}")
        if not self.modality or not all(c.isalnum() or c == "_" for c in self.modality):
            raise ConfigError(f"export.modality: 'auto' or a modality name (CT, MR, zscore), got {self.modality!r}")


@dataclass(frozen=True)
class TrainSettings:
    """nnU-Net v2 2d, fold "all", and the paper's checkpoint ensemble (METHOD.md).

    The learning rate follows a cosine from lr down to lr * min_lr_ratio within each cycle and jumps
    back at the start of the next; the last `keep_per_cycle` epochs of each cycle are kept as members.
    """

    trainer: str = "nnUNetTrainer_McsBatch"  # found by nnU-Net (its own or through nnUNet_extTrainer)
    plans: str = "nnUNetPlans"
    cycles: int = 3  # C
    epochs_per_cycle: int = 20  # epochs in one cycle of the learning rate
    keep_per_cycle: int = 10  # M: the last M epochs of each cycle are ensemble checkpoints
    iterations_per_epoch: int = 250  # nnU-Net's default
    val_iterations_per_epoch: int = 50
    lr: float = 0.01  # peak (nnU-Net's initial_lr)
    min_lr_ratio: float = 0.0
    seed: int = 0  # worker r trains with seed + r
    base_features: int = 0  # > 0: features per stage base * 2^i, capped at the plan's (tiny networks for tests)

    def __post_init__(self):
        if self.base_features < 0:
            raise ConfigError("train.base_features must be >= 0")
        if self.cycles < 1 or self.epochs_per_cycle < 1 or not 1 <= self.keep_per_cycle <= self.epochs_per_cycle:
            raise ConfigError("train: cycles >= 1, epochs_per_cycle >= 1, 1 <= keep_per_cycle <= epochs_per_cycle")
        if self.iterations_per_epoch < 1 or self.val_iterations_per_epoch < 1:
            raise ConfigError("train: iterations_per_epoch and val_iterations_per_epoch must be >= 1")
        if not self.lr > 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train: lr > 0 and 0 <= min_lr_ratio <= 1")

    @property
    def total_epochs(self) -> int:
        return self.cycles * self.epochs_per_cycle


@dataclass(frozen=True)
class RunSettings:
    """How training is spread over the cluster (does not change a member's model).

    Each worker trains one ensemble member (its own seed) on all pseudo-labels; the ensemble is every
    kept checkpoint of every member. One worker = the paper's single run.
    """

    name: str = "train-weak"  # checkpoints under WORK/checkpoints/<name>; the same name resumes
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker failures Ray Train recovers from within a run
    scratch_dir: str = ""  # node-local folder for nnU-Net's files (default: the system temp folder)
    checkpoint_every_epochs: int = 1  # resume points (and always after the last epoch)
    keep_checkpoints: int = 2  # resume points kept on storage (ensemble members are kept apart, all)
    # nnUNet_n_proc_DA per worker: auto = run.cpus_per_worker - 1 (0 with one CPU: augmentation in the loop)
    augmentation_processes: int | str = AUTO
    plan_processes: int | str = AUTO  # nnU-Net's -np / -npfp: auto = the largest node's CPUs, at most 8
    # concurrent requests of one folder copy between WORK and a node (files.py); an S3 client pools 10
    transfer_connections: int = 8

    def __post_init__(self):
        _auto_or_count("run.augmentation_processes", self.augmentation_processes, 0)
        _auto_or_count("run.plan_processes", self.plan_processes, 1)
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"run.name: {self.name!r} must be letters, digits, '-', '_' or '.'")
        if self.num_workers < 1 or self.max_failures < 0 or not self.cpus_per_worker > 0:
            raise ConfigError("run: num_workers >= 1, max_failures >= 0, cpus_per_worker > 0")
        if self.checkpoint_every_epochs < 1 or self.keep_checkpoints < 1:
            raise ConfigError("run: checkpoint_every_epochs and keep_checkpoints must be >= 1")
        if isinstance(self.transfer_connections, bool) or not isinstance(self.transfer_connections, int) \
                or self.transfer_connections < 1:  # fmt: skip
            raise ConfigError(f"run.transfer_connections: an integer >= 1, got {self.transfer_connections!r}")


@dataclass(frozen=True)
class RefineSettings:
    """The ensemble over a run's cases: mean foreground probability > threshold."""

    threshold: float = 0.2  # METHOD.md
    actors: int | str = AUTO  # actor pool size: auto = one per GPU with GPUs, else 1
    gpus_per_actor: float | str = AUTO  # auto = 1 when the cluster has GPUs (or run.use_gpu), else 0 (CPU)
    cpus_per_actor: float = 0.5  # <= 0.5 on a 2-CPU machine (ENVIRONMENT.md: actor pools can starve reads)
    batch_cases: int = 4  # cases per actor call
    max_checkpoints: int = 0  # use only the newest this many members (0 = all)
    # which slices of a volume the 2d ensemble predicts: all, or labelled (those with a zero-shot mask;
    # the others stay empty); auto = as the ensemble was trained (ensemble_slices)
    slices: str = AUTO

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"refine.threshold: must be in (0, 1), got {self.threshold}")
        _auto_or_count("refine.actors", self.actors, 1)
        if self.gpus_per_actor != AUTO and (
            isinstance(self.gpus_per_actor, bool) or not isinstance(self.gpus_per_actor, int | float)
            or self.gpus_per_actor < 0
        ):  # fmt: skip
            raise ConfigError(f"refine.gpus_per_actor: 'auto' or a number >= 0, got {self.gpus_per_actor!r}")
        if self.slices not in (AUTO, SLICES_ALL, SLICES_LABELLED):
            raise ConfigError(f"refine.slices: auto, {SLICES_ALL} or {SLICES_LABELLED}, got {self.slices!r}")
        if self.batch_cases < 1 or self.max_checkpoints < 0 or not self.cpus_per_actor > 0:
            raise ConfigError("refine: batch_cases >= 1, max_checkpoints >= 0, cpus_per_actor > 0")


SLICES_ALL, SLICES_LABELLED = "all", "labelled"  # refine.slices


def ensemble_slices(requested: str, ensemble: dict) -> str:
    """The slices refine predicts with an ensemble (its ensemble.json): `requested` unless auto; auto =
    the training's policy: "all" when it saw slices without a mask (3d_fullres, select.keep_empty_slices
    or select.empty_slice_ratio > 0), else "labelled" (a model never shown an empty slice is not asked
    about one)."""
    if requested != AUTO:
        return requested
    if "config" not in ensemble:  # not made by train-weak (synthetic_ensemble): no policy to follow
        return SLICES_ALL
    select = ensemble["config"].get("select") or {}
    saw_background = (ensemble.get("configuration") == Configuration.THREE_D.value or select.get("keep_empty_slices")
                      or float(select.get("empty_slice_ratio") or 0.0) > 0)  # fmt: skip
    return SLICES_ALL if saw_background else SLICES_LABELLED


def _auto_or_count(key: str, value, minimum: int) -> None:
    if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{key}: 'auto' or an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class WeakConfig:
    source: str = ""  # the segmentation job's OUT (local or s3://)
    target: str = ""  # the zero-shot target whose masks are the pseudo-labels
    work: str = ""  # WORK: selection.json, nnUNet_raw/, checkpoints/, logs (local or s3://)
    configuration: Configuration | str = Configuration.AUTO  # auto | 2d | 3d_fullres (Configuration)
    select: SelectionConfig = field(default_factory=SelectionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    run: RunSettings = field(default_factory=RunSettings)
    refine: RefineSettings = field(default_factory=RefineSettings)
    testing: TestingConfig = field(default_factory=TestingConfig)  # interrupt_after_step: after that epoch

    def __post_init__(self):
        try:
            object.__setattr__(self, "configuration", Configuration(self.configuration))
        except ValueError as e:
            choices = ", ".join(c.value for c in Configuration)
            raise ConfigError(f"configuration: {self.configuration!r} is not one of {choices}") from e

    @property
    def refined_target(self) -> str:
        return self.target + WEAK_SUFFIX

    @property
    def dataset_name(self) -> str:
        name = self.export.dataset_name or "".join(c if c.isalnum() else "_" for c in self.target) or "target"
        return f"Dataset{self.export.dataset_id:03d}_{name}"

    def to_dict(self) -> dict:
        return to_plain(self)

    def hash(self) -> str:
        """sha256 (16 hex) of what determines the trained ensemble: source, target, configuration,
        selection, export, train."""
        keys = ("source", "target", "configuration", "select", "export", "train")
        blob = json.dumps({k: v for k, v in self.to_dict().items() if k in keys}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_required(self) -> None:
        missing = [k for k in ("source", "target", "work") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"train-weak: {', '.join(missing)} must be set (--from, --target, --work or the YAML)")
        if self.target.endswith(WEAK_SUFFIX):
            raise ConfigError(f"--target {self.target}: choose the zero-shot target, not a refined one")


def load_weak_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    source: str | None = None,
    target: str | None = None,
    work: str | None = None,
) -> WeakConfig:
    """Defaults <- YAML file <- --from / --target / --work <- --set overrides, validated."""
    tree = to_plain(WeakConfig())
    if path is not None:
        from mcs_batch.yaml_config import merge, read_yaml_file

        merge(tree, read_yaml_file(path))
    for key, value in (("source", source), ("target", target), ("work", work)):
        if value:
            tree[key] = value
    return load(WeakConfig, overrides=overrides, tree=tree)
