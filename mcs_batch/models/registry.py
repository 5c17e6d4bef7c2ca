"""Load the method's models from a ModelsConfig: weights by URI (cached, digest-checked), then
BiomedCLIP and SAM on the chosen device. The one place that turns config into loaded models."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, protocol_of
from mcs_batch.models.biomedclip import BiomedCLIP, load_biomedclip
from mcs_batch.models.sam import SamSegmenter, write_random_sam
from mcs_batch.models.settings import ModelsConfig, SamVariant
from mcs_batch.models.weights import WeightsRecord, fetch

TINY_SAM_SEED = 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; other names as torch understands them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"models.device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"models.device {name!r}: no CUDA device on this node")
    return device


def tiny_sam_checkpoint(cache_dir: Path) -> Path:
    """A tiny random SAM checkpoint in the public format, written once into the cache (atomically)."""
    path = cache_dir / f"sam-tiny-seed{TINY_SAM_SEED}" / "sam_tiny.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        write_random_sam(tmp, SamVariant.TINY, seed=TINY_SAM_SEED)
        os.replace(tmp, path)  # concurrent writers produce identical files; the last rename wins
    return path


@dataclass
class LoadedModels:
    clip: BiomedCLIP
    sam: SamSegmenter
    weights: dict[str, WeightsRecord]  # "clip", "sam": URIs, local paths and sha256 of every file
    device: torch.device

    @property
    def tiny(self) -> bool:
        return any(record.tiny for record in self.weights.values())

    def provenance(self) -> dict:
        """What outputs record about the models (no local paths)."""
        return {name: {"uri": r.uri, "sha256": r.files, "tiny": r.tiny} for name, r in sorted(self.weights.items())}


def _storage_kwargs(uri: str, storage: StorageOptions | None) -> dict:
    return (storage or StorageOptions()).fsspec_kwargs(protocol_of(uri))


def load_clip(cfg: ModelsConfig, *, storage: StorageOptions | None = None) -> tuple[BiomedCLIP, WeightsRecord]:
    """BiomedCLIP from cfg.clip (fetched once per node, digest-checked), on cfg.device."""
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    pin = {"open_clip_pytorch_model.bin": cfg.clip_sha256} if cfg.clip_sha256 else None
    record = fetch(cfg.clip, cache_dir=cache_dir, storage_options=_storage_kwargs(cfg.clip, storage), expected=pin)
    return load_biomedclip(record, device=str(resolve_device(cfg.device))), record


def load_sam_segmenter(
    cfg: ModelsConfig, *, storage: StorageOptions | None = None
) -> tuple[SamSegmenter, WeightsRecord]:
    """SAM from cfg.sam ("tiny": a tiny random checkpoint written into the cache), on cfg.device."""
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    if cfg.sam == "tiny":
        record = fetch(str(tiny_sam_checkpoint(cache_dir)), cache_dir=cache_dir, expected=cfg.sam_sha256)
        record = WeightsRecord(uri="tiny", local_path=record.local_path, files=record.files, tiny=True)
        variant = SamVariant.TINY
    else:
        kwargs = _storage_kwargs(cfg.sam, storage)
        record = fetch(cfg.sam, cache_dir=cache_dir, storage_options=kwargs, expected=cfg.sam_sha256)
        try:
            variant = SamVariant(cfg.sam_variant)
        except ValueError as e:
            raise ConfigError(f"models.sam_variant {cfg.sam_variant!r}: {e}") from e
    device = str(resolve_device(cfg.device))
    return SamSegmenter.load(variant, record.local_path, device=device, precision=cfg.sam_precision), record


def load_models(cfg: ModelsConfig, *, storage: StorageOptions | None = None) -> LoadedModels:
    """Fetch (once per node) and load BiomedCLIP and SAM as configured."""
    clip, clip_record = load_clip(cfg, storage=storage)
    sam, sam_record = load_sam_segmenter(cfg, storage=storage)
    return LoadedModels(
        clip=clip, sam=sam, weights={"clip": clip_record, "sam": sam_record}, device=resolve_device(cfg.device)
    )
