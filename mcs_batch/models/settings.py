"""Settings of the method's models: plain frozen data and enums, importable without torch.

The job config (mcs_batch.config) composes these; the model code (biomedclip, m2ib, sam, registry)
reads them. Strings are accepted at the boundary and converted to the enums once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from mcs_batch.errors import ConfigError


class Precision(StrEnum):
    """Arithmetic of a network pass (M2IB's tower, SAM's image encoder). M2IB's alpha, KL and loss
    and SAM's decoder always run in float32."""

    FP32 = "fp32"
    BF16 = "bf16"  # torch.autocast, CUDA only
    FP16 = "fp16"  # torch.autocast, CUDA only


class SamVariant(StrEnum):
    VIT_B = "vit_b"  # sam_vit_b_01ec64.pth; default for throughput
    VIT_L = "vit_l"  # sam_vit_l_0b3195.pth
    VIT_H = "vit_h"  # sam_vit_h_4b8939.pth; the paper's choice
    TINY = "tiny"  # 2-block, 64-wide encoder with the full-size decoder; random weights for tests


class ResizeMode(StrEnum):
    """How a non-square image enters the 224 x 224 CLIP input (see models/biomedclip.py)."""

    RESIZE = "resize"  # the whole image stretched to 224 x 224
    PAD = "pad"  # zero-padded to a centred square first; never a crop


class M2IBMode(StrEnum):
    FAST = "fast"  # prefix once, alpha-only gradients, batched (same map as the reference)
    REFERENCE = "reference"  # the public code's way: everything, every step, one image at a time


def _enum(cls: type[StrEnum], value, what: str):
    try:
        return cls(value)
    except ValueError as e:
        raise ConfigError(f"{what} {value!r}: expected one of {', '.join(m.value for m in cls)}") from e


@dataclass(frozen=True)
class M2IBSettings:
    """M2IB hyperparameters; defaults are the method's (METHOD.md step 3)."""

    layer: int = 9  # 0-based ViT block whose output R is bottlenecked (BiomedCLIP: 12 blocks)
    beta: float = 1.0  # weight of the compression term (reference runs: breast 1.0, brain 2.0)
    steps: int = 10  # forward passes; the map is the KL of the last one (alpha after steps-1 updates)
    samples: int = 10  # noise samples per image and step
    lr: float = 1.0  # Adam learning rate on alpha (other Adam settings: torch defaults)
    alpha_init: float = 5.0  # initial alpha: lambda = sigmoid(5) ~ 0.993, little noise at first
    cos_eps: float = 1e-6  # eps of the cosine similarity in the fitting term
    precision: Precision = Precision.FP32  # network arithmetic; bf16/fp16 need CUDA

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _enum(Precision, self.precision, "m2ib precision"))
        if self.layer < 0:
            raise ConfigError(f"m2ib layer {self.layer}: must be >= 0")
        if self.steps < 1 or self.samples < 1:
            raise ConfigError(f"m2ib steps {self.steps}, samples {self.samples}: both must be >= 1")
        if not self.lr > 0 or not self.cos_eps > 0:
            raise ConfigError(f"m2ib lr {self.lr}, cos_eps {self.cos_eps}: both must be > 0")


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelsConfig:
    """Where the weights come from (URIs, see models/weights.py) and where they run."""

    clip: str = "tiny"  # BiomedCLIP open_clip folder: hf-hub:..., s3://.../, /path, or "tiny"
    clip_sha256: str | None = None  # pin of open_clip_pytorch_model.bin
    sam: str = "tiny"  # SAM checkpoint (.pth state dict): s3://..., /path, https://..., or "tiny"
    sam_variant: SamVariant = SamVariant.VIT_B  # vit_b | vit_l | vit_h (ignored for sam "tiny")
    sam_sha256: str | None = None  # pin of the checkpoint file
    cache_dir: str = "~/.cache/mcs-batch/models"  # per-node cache for remote weights
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    sam_precision: Precision = Precision.FP32  # fp32 | bf16 | fp16 (the latter two on CUDA only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sam_variant", _enum(SamVariant, self.sam_variant, "models.sam_variant"))
        object.__setattr__(self, "sam_precision", _enum(Precision, self.sam_precision, "models.sam_precision"))
        if not _DEVICE.match(str(self.device)):
            raise ConfigError(f"models.device {self.device!r}: expected auto, cpu, cuda or cuda:N")

    @property
    def tiny(self) -> bool:
        return self.clip.startswith("tiny") or self.sam == "tiny"
