"""Frozen job configuration: every number visible, one way to override it.

A config is built from the defaults below, then a YAML job file, then the command line's inputs,
prompts and OUT, then `--set a.b=value` overrides (values are parsed as YAML scalars), by
mcs_batch.yaml_config. Unknown keys and bad values (enum settings included) raise ConfigError naming
the key. The settings of lower layers are defined there (models.settings, models.visual_prompts,
io.window) and composed here; importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from mcs_batch.errors import ConfigError
from mcs_batch.faults import TestingConfig
from mcs_batch.io.window import WindowSettings
from mcs_batch.models.settings import M2IBSettings, ModelsConfig, ResizeMode
from mcs_batch.models.visual_prompts import PromptSettings
from mcs_batch.yaml_config import load, merge, read_yaml_file, set_path, to_plain

BIOMEDCLIP_HF = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


@dataclass(frozen=True)
class TargetConfig:
    """One thing to segment, with its prompt set and post-processing."""

    name: str = "target"  # used in output paths: letters, digits, '-' and '_' only
    prompts: tuple[str, ...] = ("a medical image",)
    coarse: PromptSettings = field(default_factory=PromptSettings)

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


@dataclass(frozen=True)
class OutputsConfig:
    uri: str = ""  # OUT: local folder or s3://bucket/prefix
    png_masks_for_2d: bool = True  # 2D images also get masks/<case_id>/<target>.png at the image's size
    catalog_flush_cases: int = 32  # cases per catalog part file (a commit); smaller = earlier visibility
    catalog_flush_seconds: float = 60.0  # ... or at least this often
    metrics_port: int = 0  # > 0: the driver serves Prometheus metrics on this port (infra/ uses 9500)


@dataclass(frozen=True)
class ResourcesConfig:
    """How the pipeline uses the cluster; does not change results (not part of the config hash)."""

    slice_chunk: int = 16  # slices of a volume decoded per load task (bounds worker memory)
    load_cpus: float = 0.5  # per load task; <= 0.5 keeps 2-CPU machines from deadlocking
    saliency_batch: int = 8  # slices per M2IB call
    saliency_actors: int = 1
    saliency_cpus: float = 0.5
    saliency_gpus: float = 0.0  # 1.0 on GPU workers
    prompts_cpus: float = 0.25
    sam_batch: int = 1  # slices per SAM image-encoder call: 1 on CPU (batching is slower there, see
    # bench/sam_bench.py), 8-16 on GPUs
    sam_actors: int = 1
    sam_cpus: float = 0.5
    sam_gpus: float = 0.0
    torch_threads: int = 0  # per model actor; 0 = torch's default


@dataclass(frozen=True)
class FailureBudget:
    max_failed_fraction: float = 0.5  # abort when more than this fraction of finished cases failed ...
    min_cases: int = 20  # ... once at least this many cases have finished


class Ablation(StrEnum):
    """The paper's ablation rows: how far through the method a mask is made."""

    SALIENCY = "saliency"  # saliency map > coarse.threshold
    POSTPROCESS = "postprocess"  # the coarse mask (k-means / Otsu / threshold)
    COMPONENTS = "components"  # + the K largest connected components
    FULL = "full"  # + SAM: the method


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

    def __post_init__(self):
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"targets: names must be unique, got {names}")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"slice_axis: must be 0, 1 or 2, got {self.slice_axis}")

    def to_dict(self) -> dict:
        return to_plain(self)

    def method_dict(self) -> dict:
        """The sections that determine the results (not where they come from or how fast)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_SECTIONS}

    def hash(self) -> str:
        """Config hash: sha256 of the canonical JSON of the method sections (16 hex characters).
        Inputs, outputs, resources, failure budget and test hooks do not change any result."""
        blob = json.dumps(self.method_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


ABLATIONS = tuple(a.value for a in Ablation)
RUN_SECTIONS = ("inputs", "outputs", "resources", "failure_budget", "testing")

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
    """Defaults <- preset <- YAML file <- prompts / target / inputs / out (the command line's
    arguments) <- --set overrides, validated."""
    tree: dict = JobConfig().to_dict()  # complete, so that --set can address any key (targets.0.name)
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"--models {preset!r}: choose from {', '.join(MODEL_PRESETS)} or use a config file")
        for key, value in MODEL_PRESETS[preset].items():
            set_path(tree, key, value)
    if path is not None:
        merge(tree, read_yaml_file(path))
    if prompts:
        tree["targets"] = [{"name": target or "target", "prompts": list(prompts)}]
    if inputs:
        tree["inputs"]["uris"] = list(inputs)
    if out:
        tree["outputs"]["uri"] = out
    return load(JobConfig, overrides=overrides, tree=tree)
