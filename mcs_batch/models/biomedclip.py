"""BiomedCLIP: the open_clip model, its tokenizer, prompt ensembling and exact CLIP image geometry.

    clip = load_biomedclip(fetch("tiny", cache_dir=...))          # or a folder Path
    t = clip.encode_prompts(["a lung", "a chest x-ray of a lung"])  # float32 [D], unit norm, cached
    pixels, geometry = to_clip_input([image_hw3_uint8], "resize")  # float32 [B, 3, 224, 224]
    saliency = map_to_image(saliency_224, geometry[0])            # float32 [H, W], image frame

Geometry (METHOD.md step 2). The reference centre-crops; we never crop:
- "resize": the whole image is stretched to 224 x 224 (aspect ratio not kept);
- "pad":    the image is padded with zeros to a centred square of side max(H, W) (the extra rows or
            columns split evenly, the odd one at the bottom / right), then resized to 224 x 224.
Images are resized bicubic (antialiased, rounded and clipped to [0, 255] as a uint8 image would be),
then normalised with BiomedCLIP's mean / std. `map_to_image` inverts the same transform bilinearly
(align_corners=False in both directions, so pixel centres map onto pixel centres).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcs_batch.models.open_clip_folder import (
    CLIP_MEAN,
    CLIP_STD,
    OPEN_CLIP_CONFIG,
    quiet_open_clip_random_init,
    read_marker,
)
from mcs_batch.models.settings import ResizeMode
from mcs_batch.models.weights import WeightsError, WeightsRecord, digest_files, load_state_dict

CLIP_IMAGE_SIZE = 224
WEIGHT_FILE_NAMES = (  # open_clip's preference order inside a local-dir folder
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)

# The hub folder of BiomedCLIP ships no config.json for its text tower (open_clip fetches it from the
# Hub by name). These are the published BiomedBERT-base numbers, used when the folder has none.
_BERT_BASE = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}
KNOWN_TEXT_TOWERS = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": _BERT_BASE,
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": _BERT_BASE,
}


@dataclass(frozen=True)
class ClipGeometry:
    """Where an image of (height, width) pixels sits in the size x size CLIP input.

    In "pad" mode the image occupies rows [top, top + height) and columns [left, left + width) of a
    zero-padded square of side `side`, which is then resized to size x size. In "resize" mode the
    whole image is resized to size x size (side, top, left are unused: max(H, W), 0, 0).
    """

    height: int
    width: int
    mode: ResizeMode
    size: int = CLIP_IMAGE_SIZE

    @classmethod
    def fit(cls, height: int, width: int, mode: ResizeMode | str, size: int = CLIP_IMAGE_SIZE):
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height} x {width}")
        return cls(int(height), int(width), ResizeMode(mode), int(size))

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def top(self) -> int:
        return (self.side - self.height) // 2 if self.mode is ResizeMode.PAD else 0

    @property
    def left(self) -> int:
        return (self.side - self.width) // 2 if self.mode is ResizeMode.PAD else 0

    def image_to_clip(self, row: float, col: float) -> tuple[float, float]:
        """Continuous (row, col) of an image pixel centre -> the same point in CLIP input pixels."""
        if self.mode is ResizeMode.PAD:
            scale_r = scale_c = self.size / self.side
            row, col = row + self.top, col + self.left
        else:
            scale_r, scale_c = self.size / self.height, self.size / self.width
        return (row + 0.5) * scale_r - 0.5, (col + 0.5) * scale_c - 0.5


def resize_for_clip(
    image: np.ndarray, mode: ResizeMode | str = "resize", *, size: int = CLIP_IMAGE_SIZE
) -> tuple[np.ndarray, ClipGeometry]:
    """One image, placed into the CLIP square before normalisation.

    image: uint8 [H, W, 3] RGB (or [H, W] grey, repeated to 3 channels)
    returns float32 [size, size, 3] with integer values in [0, 255], and its ClipGeometry.
    """
    import torch
    import torch.nn.functional as F

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"CLIP input images must be uint8 RGB, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CLIP input images must be [H, W, 3] (or [H, W]), got {image.shape}")
    geometry = ClipGeometry.fit(image.shape[0], image.shape[1], mode, size)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if geometry.mode is ResizeMode.PAD:
        canvas = torch.zeros((1, 3, geometry.side, geometry.side))
        canvas[:, :, geometry.top : geometry.top + geometry.height, geometry.left : geometry.left + geometry.width] = x
        x = canvas
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    return x[0].permute(1, 2, 0).numpy(), geometry


def to_clip_input(
    images: Sequence[np.ndarray],
    mode: ResizeMode | str = "resize",
    *,
    size: int = CLIP_IMAGE_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
):
    """A batch for the vision tower: (float32 [B, 3, size, size] normalised, list of ClipGeometry).

    images: uint8 [H, W, 3] RGB each, any sizes (see `resize_for_clip`).
    """
    import torch

    if len(images) == 0:
        raise ValueError("to_clip_input needs at least one image")
    placed, geometries = zip(*(resize_for_clip(im, mode, size=size) for im in images), strict=True)
    x = torch.from_numpy(np.stack(placed)).permute(0, 3, 1, 2).contiguous() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).float(), list(geometries)


def map_to_image(saliency224, geometry: ClipGeometry) -> np.ndarray:
    """A map over the CLIP input (float [size, size], ndarray or tensor) -> float32 [H, W], image frame.

    The exact inverse of the placement: bilinear resize (align_corners=False) back to the image, or
    to the padded square and then the padding cropped away.
    """
    import torch
    import torch.nn.functional as F

    s = torch.as_tensor(saliency224).detach().to("cpu", torch.float32)
    if tuple(s.shape) != (geometry.size, geometry.size):
        raise ValueError(f"saliency must be [{geometry.size}, {geometry.size}], got {tuple(s.shape)}")
    padded = geometry.mode is ResizeMode.PAD
    out_hw = (geometry.side, geometry.side) if padded else (geometry.height, geometry.width)
    s = s[None, None]
    if out_hw != tuple(s.shape[-2:]):
        s = F.interpolate(s, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    s = s[0, 0, geometry.top : geometry.top + geometry.height, geometry.left : geometry.left + geometry.width]
    return s.contiguous().numpy().astype(np.float32, copy=False)


def ensemble_prompts(features):
    """Prompt ensembling (METHOD.md step 1): normalise each row, average, normalise again.

    features: float [N, D] text features (any scale) -> float32 [D], unit L2 norm. Differentiable.
    """
    import torch.nn.functional as F

    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected text features [N >= 1, D], got {tuple(features.shape)}")
    mean = F.normalize(features.float(), dim=-1).mean(dim=0)
    return F.normalize(mean, dim=-1)


@dataclass(eq=False)
class BiomedCLIP:
    """A loaded BiomedCLIP (eval mode, parameters frozen) with what callers need to know about it.

    model:          the open_clip CustomTextCLIP (model.visual.trunk is the timm ViT)
    tokenizer:      open_clip HFTokenizer: list[str] -> int64 [N, context_length]
    embed_dim:      D of image and text embeddings (512 for BiomedCLIP)
    vision_layers:  number of ViT blocks (M2IB's `layer` indexes them, 0-based)
    vision_width:   token width of the ViT (768 for BiomedCLIP)
    files, uri, tiny: provenance (see WeightsRecord); tiny=True means meaningless random weights
    """

    model: object
    tokenizer: object
    folder: Path
    uri: str
    embed_dim: int
    vision_layers: int
    vision_width: int
    context_length: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    files: dict[str, str]
    tiny: bool
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]):
        """int64 [N, context_length] token ids on the model's device ([CLS] ... [SEP] [PAD]...)."""
        prompts = _prompt_tuple(prompts)
        return self.tokenizer(list(prompts)).to(self.device)

    def text_encoder(self, prompts: Sequence[str]):
        """Text features float32 [N, D], NOT normalised, under the caller's autograd mode.

        For code that re-encodes the text with gradients (M2IB reference mode, fine-tuning): call
        model.requires_grad_(True) first if the text weights themselves need gradients.
        """
        return self.model.encode_text(self.tokenize(prompts))

    def encode_prompts(self, prompts: Sequence[str]):
        """The target text embedding: float32 [D], unit norm, prompt-ensembled; cached per prompt tuple."""
        import torch

        key = _prompt_tuple(prompts)
        if key not in self._prompt_cache:
            with torch.no_grad():
                self._prompt_cache[key] = ensemble_prompts(self.text_encoder(key)).detach()
        return self._prompt_cache[key].clone()

    def image_encoder(self, pixels):
        """Image features float32 [B, D], NOT normalised, from a `to_clip_input` batch."""
        return self.model.encode_image(pixels.to(self.device))

    def to_clip_input(self, images: Sequence[np.ndarray], mode: ResizeMode | str = "resize"):
        """`to_clip_input` with this model's image size / mean / std, on its device."""
        pixels, geometries = to_clip_input(images, mode, size=self.image_size, mean=self.mean, std=self.std)
        if self.device.type == "cuda":  # page-locked host memory: an asynchronous copy
            return pixels.pin_memory().to(self.device, non_blocking=True), geometries
        return pixels.to(self.device), geometries

    def provenance(self) -> dict:
        """What outputs record about the model."""
        return {"uri": self.uri, "files": dict(sorted(self.files.items())), "tiny": self.tiny}


def _prompt_tuple(prompts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(prompts, str):
        prompts = (prompts,)
    prompts = tuple(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty sequence of non-empty strings, got {prompts!r}")
    return prompts


# -- loading ------------------------------------------------------------------------------------------


def load_biomedclip(source: WeightsRecord | str | Path, *, device: str = "cpu") -> BiomedCLIP:
    """Build BiomedCLIP from a folder in open_clip `local-dir:` layout (a fetched record or a path).

    The HF text tower is always pointed at the folder itself (whatever path its config names), the
    weights are loaded with `load_state_dict` (no pickled code) and strictly (every key must match).
    """
    import open_clip

    if isinstance(source, WeightsRecord):
        folder, uri, files, tiny = source.local_path, source.uri, dict(source.files), source.tiny
    else:
        folder = Path(source).absolute()
        uri = str(folder)
        if not folder.is_dir():
            raise WeightsError(f"{uri}: BiomedCLIP needs a folder in open_clip local-dir layout")
        files = digest_files(folder)
        tiny = bool((read_marker(folder) or {}).get("tiny"))
    if not folder.is_dir():
        raise WeightsError(f"{uri}: BiomedCLIP needs a folder in open_clip local-dir layout, got a file")
    config = _read_config(folder, uri)
    model_cfg = config["model_cfg"]
    weights_path = next((folder / n for n in WEIGHT_FILE_NAMES if (folder / n).is_file()), None)
    if weights_path is None:
        raise WeightsError(f"{uri}: no weights file (one of {', '.join(WEIGHT_FILE_NAMES)})")
    state = load_state_dict(weights_path)

    with _text_tower_dir(folder, model_cfg["text_cfg"], uri) as text_dir, quiet_open_clip_random_init():
        text_cfg = dict(model_cfg["text_cfg"], hf_model_name=text_dir, hf_tokenizer_name=str(folder))
        text_cfg["hf_model_pretrained"] = False
        model = open_clip.create_model(
            "local-dir:" + str(folder), load_weights=False, pretrained_text=False, text_cfg=text_cfg
        )
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(folder))
    image_size = int(model_cfg["vision_cfg"].get("image_size", CLIP_IMAGE_SIZE))
    _load_weights(model, state, uri, image_size)
    model.eval().requires_grad_(False).to(device)

    preprocess = config.get("preprocess_cfg", {})
    trunk = model.visual.trunk
    return BiomedCLIP(
        model=model,
        tokenizer=tokenizer,
        folder=folder,
        uri=uri,
        embed_dim=int(model_cfg["embed_dim"]),
        vision_layers=len(trunk.blocks),
        vision_width=int(trunk.embed_dim),
        context_length=int(tokenizer.context_length),
        image_size=image_size,
        mean=tuple(float(v) for v in preprocess.get("mean", CLIP_MEAN)),
        std=tuple(float(v) for v in preprocess.get("std", CLIP_STD)),
        files=files,
        tiny=tiny,
    )


def _read_config(folder: Path, uri: str) -> dict:
    path = folder / OPEN_CLIP_CONFIG
    try:
        config = json.loads(path.read_text())
        model_cfg = config["model_cfg"]
        ok = "timm_model_name" in model_cfg["vision_cfg"] and "hf_model_name" in model_cfg["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{uri}: no readable {OPEN_CLIP_CONFIG} with a model_cfg ({e})") from e
    if not ok:
        raise WeightsError(f"{uri}: {OPEN_CLIP_CONFIG} is not BiomedCLIP-like (timm vision + HF text tower)")
    return config


@contextlib.contextmanager
def _text_tower_dir(folder: Path, text_cfg: dict, uri: str) -> Iterator[str]:
    """A local folder holding the text tower's HF config.json: the folder itself, or a temporary one
    with the published config of a known text tower (the BiomedCLIP hub folder has none)."""
    if (folder / "config.json").is_file():
        yield str(folder)
        return
    name = str(text_cfg.get("hf_model_name", ""))
    if name not in KNOWN_TEXT_TOWERS:
        raise WeightsError(
            f"{uri}: the folder has no config.json for its text tower {name!r}, and that tower is not one "
            f"of {sorted(KNOWN_TEXT_TOWERS)}"
        )
    with tempfile.TemporaryDirectory(prefix="mcs-text-tower-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(KNOWN_TEXT_TOWERS[name]))
        yield tmp


# Buffers that older transformers saved and newer ones recompute (never learned weights).
_BENIGN_EXTRA = ("position_ids", "token_type_ids")


def _load_weights(model, state: dict, uri: str, image_size: int) -> None:
    """Strict load of an open_clip state dict, after the few fix-ups that are not weight changes."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith(_BENIGN_EXTRA)}
    if "logit_scale" in state and state["logit_scale"].shape != expected["logit_scale"].shape:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    trunk = model.visual.trunk
    pos = state.get("visual.trunk.pos_embed")
    if pos is not None and pos.shape != trunk.pos_embed.shape:
        _set_token_grid(trunk, pos.shape[1], uri)  # weights saved at another input size
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{uri}: weights do not fit the configured architecture: {len(missing)} missing "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{uri}: weights do not fit the configured architecture: {e}") from e
    if tuple(trunk.patch_embed.img_size) != (image_size, image_size):
        # e.g. timm's test_vit is natively 160 x 160: run it at BiomedCLIP's 224 (197 tokens).
        trunk.set_input_size(img_size=(image_size, image_size))


def _set_token_grid(trunk, n_tokens: int, uri: str) -> None:
    n_patches = n_tokens - trunk.num_prefix_tokens
    side = math.isqrt(max(n_patches, 0))
    if side * side != n_patches:
        raise WeightsError(f"{uri}: position embedding of {n_tokens} tokens is not a square grid")
    patch = trunk.patch_embed.patch_size[0]
    trunk.set_input_size(img_size=(side * patch, side * patch))
