"""Frozen job configuration: every number visible, one way to override it.

A config is built from the defaults below, then a YAML job file, then `--set a.b=value` overrides
(values are parsed as YAML scalars). Unknown keys and bad values raise ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcs_batch.errors import ConfigError
from mcs_batch.io.window import WindowSettings
from mcs_batch.models.m2ib import M2IBSettings
from mcs_batch.stages.prompts import PromptSettings

BIOMEDCLIP_HF = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


@dataclass(frozen=True)
class ModelsConfig:
    """Where the weights come from (URIs, see models/weights.py) and where they run."""

    clip: str = "tiny"  # BiomedCLIP open_clip folder: hf-hub:..., s3://.../, /path, or "tiny"
    clip_sha256: str | None = None  # pin of open_clip_pytorch_model.bin
    sam: str = "tiny"  # SAM checkpoint (.pth state dict): s3://..., /path, https://..., or "tiny"
    sam_variant: str = "vit_b"  # vit_b | vit_l | vit_h (ignored for sam "tiny")
    sam_sha256: str | None = None  # pin of the checkpoint file
    cache_dir: str = "~/.cache/mcs-batch/models"  # per-node cache for remote weights
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    sam_precision: str = "fp32"  # fp32 | bf16 | fp16 (the latter two on CUDA only)

    @property
    def tiny(self) -> bool:
        return self.clip.startswith("tiny") or self.sam == "tiny"


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
    resize: str = "resize"  # resize (stretch whole image) | pad (pad to square); never crops


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


@dataclass(frozen=True)
class TestingConfig:
    """Fault injection for tests only (default off)."""

    kill_sam_actor_after_batches: int = 0  # > 0: a SAM actor exits hard once, after this many batches
    fault_marker: str = ""  # file that records that the fault fired (so it fires once)
    exit_driver_after_commits: int = 0  # > 0: the driver exits hard (no clean-up) after this many commits


@dataclass(frozen=True)
class JobConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    m2ib: M2IBSettings = field(default_factory=M2IBSettings)
    clip: ClipConfig = field(default_factory=ClipConfig)
    window: WindowSettings = field(default_factory=WindowSettings)
    targets: tuple[TargetConfig, ...] = (TargetConfig(),)
    seed: int = 0  # all randomness derives from this, per case and slice (mcs_batch.seeding)
    slice_axis: int = 2  # volumes are segmented slice by slice along this array axis
    # Ablation (the paper's rows): saliency = map > coarse.threshold; postprocess = the coarse mask;
    # components = + K largest components; full = + SAM (the method)
    ablation: str = "full"
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
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation: {self.ablation!r} is not one of {', '.join(ABLATIONS)}")

    def to_dict(self) -> dict:
        return _to_plain(self)

    def method_dict(self) -> dict:
        """The sections that determine the results (not where they come from or how fast)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_SECTIONS}

    def hash(self) -> str:
        """Config hash: sha256 of the canonical JSON of the method sections (16 hex characters).
        Inputs, outputs, resources, failure budget and test hooks do not change any result."""
        blob = json.dumps(self.method_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


ABLATIONS = ("saliency", "postprocess", "components", "full")
RUN_SECTIONS = ("inputs", "outputs", "resources", "failure_budget", "testing")

# Presets for --models: tiny random models (smoke runs, tests) or the published weights.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"models.clip": "tiny", "models.sam": "tiny", "m2ib.layer": 4},  # tiny tower: 6 blocks
    "real": {"models.clip": BIOMEDCLIP_HF, "models.sam": SAM_VIT_B_URL, "models.sam_variant": "vit_b"},
}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # StrEnum
        return value.value
    return value


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls, data: Any, path: str):
    """Instantiate dataclass `cls` from a mapping, recursively, naming bad keys by their path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _coerce(hint: Any, value: Any, path: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, path)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str | dict) or not isinstance(value, list | tuple):
            value = [value]
        if Ellipsis in args or len(args) == 1:  # tuple[X, ...]: any length
            items = [args[0]] * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        else:
            items = list(args)
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, (item, v) in enumerate(zip(items, value, strict=True)))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} is not a valid {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, str):  # StrEnum fields
        try:
            return hint(value)
        except ValueError as e:
            raise ConfigError(f"{path}: {value!r} is not one of {[m.value for m in hint]}") from e
    return value


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def read_yaml_file(path: str | Path) -> dict:
    """A YAML job / finetune file as a mapping; ConfigError naming the file when it is not one."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML ({e})") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return loaded


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """`--set key=value` overrides, in order."""
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: no item {key} (the list has {len(node)})")
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    last = keys[-1]
    if last.isdigit() and isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({e})") from e
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | None = None,
    prompts: list[str] | tuple[str, ...] = (),
    target: str | None = None,
) -> JobConfig:
    """Defaults <- preset <- YAML file <- --prompt/--target <- --set overrides, validated."""
    tree: dict = JobConfig().to_dict()  # complete, so that --set can address any key (targets.0.name)
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"--models {preset!r}: choose from {', '.join(MODEL_PRESETS)} or use a config file")
        for key, value in MODEL_PRESETS[preset].items():
            _set_path(tree, key, value)
    if path is not None:
        merge(tree, read_yaml_file(path))
    if prompts:
        tree["targets"] = [{"name": target or "target", "prompts": list(prompts)}]
    apply_overrides(tree, overrides)
    return _build(JobConfig, tree, "")


def merge(base: dict, extra: dict) -> None:
    """Merge `extra` into `base`, recursively for mappings (lists and values replace)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
