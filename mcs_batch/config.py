"""Frozen job configuration: every number visible, one way to override it.

A config is built from the defaults below, then a YAML job file, then the command line's inputs,
prompts and OUT, then `--set a.b=value` overrides (values are parsed as YAML scalars), by
mcs_batch.yaml_config. Unknown keys and bad values (enum settings included) raise ConfigError naming
the key. The settings of lower layers are defined there (models.settings, models.visual_prompts,
io.window) and composed here; importing this module does not import torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from mcs_batch.errors import ConfigError
from mcs_batch.faults import TestingConfig
from mcs_batch.io.limits import SizeLimits
from mcs_batch.io.window import WindowSettings
from mcs_batch.models.settings import M2IBSettings, ModelsConfig, ResizeMode
from mcs_batch.models.visual_prompts import PromptSettings
from mcs_batch.yaml_config import load, merge, read_yaml_file, set_path, to_plain

BIOMEDCLIP_HF = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


@dataclass(frozen=True)
class Code:
    """A coded concept as DICOM writes it: code value, coding scheme designator, code meaning."""

    value: str | int = "85756007"  # a string once built (YAML and --set read SNOMED codes as numbers)
    scheme: str = "SCT"  # SNOMED CT; DCM for DICOM's own codes
    meaning: str = "Tissue"

    def __post_init__(self):
        object.__setattr__(self, "value", str(self.value))
        if not (str(self.value).strip() and str(self.scheme).strip() and str(self.meaning).strip()):
            raise ConfigError(
                f"targets.dicom_seg: code {self.value!r} ({self.scheme}, {self.meaning!r}) "
                "needs a value, a scheme and a meaning"
            )


@dataclass(frozen=True)
class SegmentCodes:
    """How a target is described as a segment of a DICOM SEG (outputs.dicom_seg): its segmented property
    category (CID 7150) and type (CID 7151). The defaults say no more than "tissue" (as 3D Slicer's generic
    segment does); a lesion would be category 49755003 "Morphologically abnormal structure", type
    108369006 "Neoplasm". Not part of the config hash: they label the result, they do not change it."""

    category: Code = field(default_factory=Code)  # SCT 85756007 Tissue
    type: Code = field(default_factory=Code)  # SCT 85756007 Tissue


@dataclass(frozen=True)
class TargetConfig:
    """One thing to segment, with its prompt set and post-processing."""

    name: str = "target"  # used in output paths: letters, digits, '-' and '_' only
    prompts: tuple[str, ...] = ("a medical image",)
    coarse: PromptSettings = field(default_factory=PromptSettings)
    dicom_seg: SegmentCodes = field(default_factory=SegmentCodes)  # coded concepts of its DICOM SEG segment

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"targets: name {self.name!r} must be letters, digits, '-' or '_'")
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ConfigError(f"targets.{self.name}.prompts: at least one non-empty prompt is needed")


@dataclass(frozen=True)
class ClipConfig:
    resize: ResizeMode = ResizeMode.RESIZE  # resize (stretch whole image) | pad (pad to square); never crops


@dataclass(frozen=True)
class InputsConfig:
    uris: tuple[str, ...] = ()  # files or prefixes: /path, file://, s3://bucket/prefix, ...
    include: tuple[str, ...] = ()  # glob patterns on keys relative to each input (empty: everything)
    exclude: tuple[str, ...] = ()
    index: str = ""  # the archive index (objects, versions, headers, cases): default OUT/index
    wave_objects: int = 2000  # objects per scan wave: a DICOM series is released for segmentation once
    # the wave after the last one holding its files has been read (series contiguous in key order)

    def __post_init__(self):
        if self.wave_objects < 1:
            raise ConfigError(f"inputs.wave_objects: must be >= 1, got {self.wave_objects}")


@dataclass(frozen=True)
class OutputsConfig:
    uri: str = ""  # OUT: local folder or s3://bucket/prefix
    png_masks_for_2d: bool = True  # 2D images also get masks/<case_id>/<target>.png at the image's size
    # A commit costs the driver ~85 ms of CPU whatever its size (delta-rs: the log, the merge's plan):
    # 0.33 ms per case at 256 cases, 0.04 at 2,048. A slow job commits by time, a fast one by size.
    catalog_flush_cases: int = 2048  # cases per catalog part file (a commit) at most ...
    catalog_flush_slices: int = 200_000  # ... or this many slice rows (volumes: ~330 CT series of 600 slices) ...
    catalog_flush_seconds: float = 10.0  # ... and a commit at least this often (the first case at once)
    metrics_port: int = 0  # > 0: the driver serves Prometheus metrics on this port (infra/ uses 9500)
    metrics_linger_seconds: float = 60.0  # ... and keeps serving the final values this long after the job
    heartbeat_ttl_seconds: float = 120.0  # a run whose heartbeat (every 10 s) is older than this is dead
    compact_min_files: int = 64  # at its end a job compacts the catalog tables holding this many files or more
    dicom_seg: bool = False  # DICOM cases also get masks/<case_id>/<target>.seg.dcm (binary DICOM SEG)
    # dicomweb(s)://HOST[:PORT]/PATH of a PACS: every SEG (dicom_seg) is also stored there by STOW-RS after
    # its rows are committed; what the store answered is the catalog's `stored` table (outputs/pacs_store.py)
    dicomweb_store: str = ""

    def __post_init__(self):
        if self.dicomweb_store:
            from mcs_batch.io.dicomweb import parse_uri

            where = parse_uri(self.dicomweb_store)
            if where.query or where.study:
                raise ConfigError(f"outputs.dicomweb_store: {self.dicomweb_store}: name the server's DICOMweb root "
                                  "(no query, study or series)")  # fmt: skip
            if not self.dicom_seg:
                raise ConfigError("outputs.dicomweb_store: needs outputs.dicom_seg=true (it stores the SEGs)")


AUTO = "auto"


def _auto_or(value, kind: type, minimum: float, key: str):
    """'auto', or a number >= minimum (ints for counts)."""
    if value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"resources.{key}: expected 'auto' or a{'n integer' if kind is int else ' number'}, "
                          f"got {value!r}")  # fmt: skip
    if value < minimum:
        raise ConfigError(f"resources.{key}: must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ResourcesConfig:
    """How the job uses the cluster; does not change results (not part of the config hash).

    "auto" values are resolved against the cluster when a job starts (mcs_batch/pipeline/resources.py)
    and recorded in its run record; explicit values override. With GPUs in the cluster each GPU holds
    one M2IB and one SAM actor (0.5 GPU each); without, the model pools autoscale over the CPUs.
    """

    gpus: float | str = AUTO  # GPUs the model pools use: auto = the cluster's GPUs at start; 0 = CPU only
    slice_chunk: int = 16  # slices of a volume decoded per load task (bounds worker memory)
    # slice rows per block after decoding, the unit of parallel work for the models: auto = 8 on CPU (a
    # block takes a CPU SAM actor ~4 s with tiny models, so the first cases commit early), 32 on GPU
    block_rows: int | str = AUTO
    # CPUs reserved per task (a concurrency limit, not a cap): small, so that on a 2-CPU machine the
    # model actors (0.5 each) never take every slot and leave the decoding without one
    load_cpus: float = 0.25  # per task planning and decoding cases
    parts_cpus: float = 0.25  # per task writing a block's slice results to staging
    assemble_cpus: float = 0.25  # per task assembling finished cases into masks (in the cluster)
    saliency_batch: int | str = AUTO  # slices per M2IB call: auto = 8 on CPU, 32 on GPU
    saliency_actors: int | str = AUTO  # auto: one per GPU; on CPU an autoscaling pool of 1..CPUs/2 (SAM: 1..CPUs)
    saliency_cpus: float = 0.5
    saliency_gpus: float | str = AUTO  # auto: 0.5 when the pools have GPUs, else 0
    sam_batch: int | str = AUTO  # slices per SAM image-encoder call: auto = 1 on CPU (batching is slower
    # there, see bench/sam_bench.py), 8 on GPU
    sam_actors: int | str = AUTO
    sam_cpus: float = 0.5
    sam_gpus: float | str = AUTO
    torch_threads: int | str = AUTO  # per model actor: auto = 1 on CPU (actors x threads = cores), 4 on GPU
    # one actor pool running M2IB and then SAM on each block (the SAM pool's sizes, both models loaded
    # once per actor) instead of two pools: auto = together on CPU (one start-up per actor instead of
    # two, no hand-over of images between the stages), two pools when the cluster has GPUs
    models_together: bool | str = AUTO
    # larger slices fail as too_large (a 2-CPU node stays alive), judged from headers (io/limits.py)
    max_image_pixels: int = SizeLimits.max_image_pixels
    # cases decoded whole (NIfTI, multi-frame, slice_axis other than 2, reoriented) larger than this fail
    max_volume_voxels: int = SizeLimits.max_volume_voxels
    gpu_wait_seconds: float = 600.0  # gpus asked for, none in the cluster: wait this long for the autoscaler
    # drivers coordinating the job (pipeline/shards.py): N shard drivers, each a Ray actor streaming its
    # share of the archive (contiguous in key order, cut between waves) into the same catalog; auto = as
    # many as the cluster's GPUs need (pipeline/resources.drivers_for; 1 without GPUs)
    drivers: int | str = AUTO
    driver_cpus: float = 0.0  # CPUs reserved per shard driver actor (0: none, like Ray's own driver)
    # "i/N" (1 <= i <= N): this job is shard i of N of the archive, for sites that submit N separate jobs
    # (the CLI's --shard); "" = the whole archive
    shard: str = ""

    def __post_init__(self):
        _auto_or(self.gpus, float, 0, "gpus")
        for key in ("saliency_batch", "sam_batch", "saliency_actors", "sam_actors", "block_rows"):
            _auto_or(getattr(self, key), int, 1, key)
        for key in ("saliency_gpus", "sam_gpus"):
            _auto_or(getattr(self, key), float, 0, key)
        _auto_or(self.torch_threads, int, 0, "torch_threads")
        if self.models_together != AUTO and not isinstance(self.models_together, bool):
            raise ConfigError(
                f"resources.models_together: expected 'auto', true or false, got {self.models_together!r}"
            )
        if self.slice_chunk < 1 or self.max_image_pixels < 1 or self.max_volume_voxels < 1:
            raise ConfigError("resources: slice_chunk, max_image_pixels and max_volume_voxels must be >= 1")
        _auto_or(self.drivers, int, 1, "drivers")
        if isinstance(self.driver_cpus, bool) or not isinstance(self.driver_cpus, int | float) or self.driver_cpus < 0:
            raise ConfigError(f"resources.driver_cpus: expected a number >= 0, got {self.driver_cpus!r}")
        self.shard_spec()  # a malformed shard: said at load time

    def shard_spec(self) -> tuple[int, int] | None:
        """(i, N) with 0 <= i < N (0-based) for `shard: "i/N"` (1-based, as written), None for the whole
        archive."""
        if not self.shard:
            return None
        text = str(self.shard).strip()
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            i = n = 0
        if not (n >= 1 and 1 <= i <= n):
            raise ConfigError(f"resources.shard: expected 'i/N' with 1 <= i <= N (e.g. 2/4), got {self.shard!r}")
        return i - 1, n

    def size_limits(self) -> SizeLimits:
        return SizeLimits(max_image_pixels=self.max_image_pixels, max_volume_voxels=self.max_volume_voxels)


@dataclass(frozen=True)
class FailureBudget:
    max_failed_fraction: float = 0.5  # abort when more than this fraction of finished cases failed ...
    min_cases: int = 20  # ... once at least this many cases have finished
    transient_attempts: int = 3  # runs that try a pair whose failures are transient (storage, memory)

    def __post_init__(self):
        if self.transient_attempts < 1:
            raise ConfigError(f"failure_budget.transient_attempts: must be >= 1, got {self.transient_attempts}")


class Ablation(StrEnum):
    """The paper's ablation rows: how far through the method a mask is made."""

    SALIENCY = "saliency"  # saliency map > coarse.threshold
    POSTPROCESS = "postprocess"  # the coarse mask (k-means / Otsu / threshold)
    COMPONENTS = "components"  # + the K largest connected components
    FULL = "full"  # + SAM: the method


@dataclass(frozen=True)
class WeakTriggerConfig:
    """The trigger of weakly supervised retraining (mcs_batch/train/weak): after a run that committed
    new ok cases and did not abort, submit `train-weak --refine` for each target as its own Ray job."""

    enabled: bool = False
    address: str = ""  # the cluster's Ray job API, e.g. http://127.0.0.1:8265 (required when enabled)
    work: str = ""  # storage for checkpoints and logs; default OUT/weak/<target>
    config: str = ""  # a train_weak.yaml as the cluster sees it (default: the built-in recipe)
    overrides: tuple[str, ...] = ()  # --set items for train-weak
    refine: bool = True  # refine the run's cases once trained

    def __post_init__(self):
        if isinstance(self.overrides, str):
            object.__setattr__(self, "overrides", (self.overrides,))
        if self.enabled and not self.address:
            raise ConfigError("weak.address: the Ray job API to submit retraining to is required when weak.enabled")


@dataclass(frozen=True)
class JobConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    m2ib: M2IBSettings = field(default_factory=M2IBSettings)
    clip: ClipConfig = field(default_factory=ClipConfig)
    window: WindowSettings = field(default_factory=WindowSettings)
    targets: tuple[TargetConfig, ...] = (TargetConfig(),)
    seed: int = 0  # all randomness derives from this, per case and slice (mcs_batch.seeding)
    slice_axis: int = 2  # volumes are segmented slice by slice along this array axis
    ablation: Ablation = Ablation.FULL  # the paper's ablation rows (see Ablation)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    failure_budget: FailureBudget = field(default_factory=FailureBudget)
    testing: TestingConfig = field(default_factory=TestingConfig)
    weak: WeakTriggerConfig = field(default_factory=WeakTriggerConfig)

    def __post_init__(self):
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"targets: names must be unique, got {names}")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"slice_axis: must be 0, 1 or 2, got {self.slice_axis}")

    def to_dict(self) -> dict:
        return to_plain(self)

    def method_dict(self) -> dict:
        """The settings that determine the results (not where they come from, where they go or how
        fast). The run-only keys of `models` are set to their defaults rather than dropped, so that
        the hash of a config that never set them stays what it was."""
        tree = {k: v for k, v in self.to_dict().items() if k not in RUN_SECTIONS}
        defaults = ModelsConfig()
        tree["models"].update({key: getattr(defaults, key) for key in RUN_MODEL_KEYS})
        for target in tree["targets"]:
            target.pop("dicom_seg")  # labels of the SEG's segment, not of the method
        tree["preprocessing"] = PREPROCESSING_VERSION
        return tree

    def hash(self) -> str:
        """Config hash: sha256 of the canonical JSON of `method_dict` (16 hex characters). Inputs,
        outputs, resources, failure budget, test hooks, the weight cache and the device do not
        change any result."""
        return self._hash

    @functools.cached_property
    def _hash(self) -> str:  # every catalog row carries it: computed once per (frozen) config
        blob = json.dumps(self.method_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


ABLATIONS = tuple(a.value for a in Ablation)
RUN_SECTIONS = ("inputs", "outputs", "resources", "failure_budget", "testing", "weak")
RUN_MODEL_KEYS = ("cache_dir", "device")  # where the weights are cached and which device runs them
# How pixels become model input, where no setting says it: 2 = 8-bit greyscale as stored (1 stretched
# it) and NIfTI volumes in the L, P, S display orientation (1 showed them as stored). Part of the hash:
# an OUT written under another version refuses a backfill instead of mixing the two.
PREPROCESSING_VERSION = 2

# Presets for --models: tiny random models (smoke runs, tests) or the published weights.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"models.clip": "tiny", "models.sam": "tiny", "m2ib.layer": 4},  # tiny tower: 6 blocks
    "real": {"models.clip": BIOMEDCLIP_HF, "models.sam": SAM_VIT_B_URL, "models.sam_variant": "vit_b"},
}


def load_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | None = None,
    prompts: list[str] | tuple[str, ...] = (),
    target: str | None = None,
    inputs: list[str] | tuple[str, ...] = (),
    out: str | None = None,
) -> JobConfig:
    """Defaults <- YAML file <- the command line's arguments (preset, prompts / target, inputs, out)
    <- --set overrides, validated. An explicit `--models tiny` wins over the file's weights."""
    tree: dict = JobConfig().to_dict()  # complete, so that --set can address any key (targets.0.name)
    if path is not None:
        merge(tree, read_yaml_file(path))
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"--models {preset!r}: choose from {', '.join(MODEL_PRESETS)} or use a config file")
        for key, value in MODEL_PRESETS[preset].items():
            set_path(tree, key, value)
    if prompts:
        tree["targets"] = [{"name": target or "target", "prompts": list(prompts)}]
    if inputs:
        tree["inputs"]["uris"] = list(inputs)
    if out:
        tree["outputs"]["uri"] = out
    return load(JobConfig, overrides=overrides, tree=tree)
