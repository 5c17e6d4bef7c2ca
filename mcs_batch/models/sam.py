"""SAM (segment-anything 1.0) for batches of images: builders, safe checkpoint loading, box-prompted masks.

METHOD.md step 6, with SamPredictor's exact conventions: each image is resized so that its longest side
is 1024 (ResizeLongestSide, PIL bilinear), normalised with SAM's pixel mean / std and zero-padded to
1024 x 1024; boxes and points are scaled the same way. What differs from calling SamPredictor per image
is only the batching: ONE image-encoder call for a batch of images, then per image ONE prompt-encoder /
mask-decoder call with all its boxes. The modules themselves are segment_anything's.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from segment_anything.utils.transforms import ResizeLongestSide

from mcs_batch.errors import ConfigError
from mcs_batch.models.settings import Precision, SamVariant
from mcs_batch.models.visual_prompts import largest_components
from mcs_batch.models.weights import load_state_dict


def _assemble_sam(
    *,
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    image_size: int = 1024,  # the encoder's square input
    patch_size: int = 16,  # -> 64 x 64 image embedding
    window_size: int = 14,  # windowed attention in the non-global blocks
    mlp_ratio: float = 4.0,
    prompt_embed_dim: int = 256,  # channels of the image embedding and of the prompt tokens
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    num_multimask_outputs: int = 3,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
    pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),  # RGB, 0..255
    pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
) -> Sam:
    """A randomly initialised SAM in eval mode, from segment_anything's modules."""
    embedding_size = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            mlp_ratio=mlp_ratio,
            out_chans=prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=decoder_depth,
                embedding_dim=prompt_embed_dim,
                mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=list(pixel_mean),
        pixel_std=list(pixel_std),
    ).eval()


def build_sam_vit_b() -> Sam:
    return _assemble_sam(
        encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)
    )


def build_sam_vit_l() -> Sam:
    return _assemble_sam(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    )


def build_sam_vit_h() -> Sam:
    return _assemble_sam(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    )


def build_sam_tiny() -> Sam:
    return _assemble_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,))


SAM_BUILDERS: dict[SamVariant, Callable[[], Sam]] = {
    SamVariant.VIT_B: build_sam_vit_b,
    SamVariant.VIT_L: build_sam_vit_l,
    SamVariant.VIT_H: build_sam_vit_h,
    SamVariant.TINY: build_sam_tiny,
}


def _variant(variant: SamVariant | str) -> SamVariant:
    try:
        return SamVariant(variant)
    except ValueError as e:
        raise ConfigError(f"unknown SAM variant {variant!r}; known: {', '.join(SamVariant)}") from e


# -- weights -------------------------------------------------------------------------------------


def random_sam(variant: SamVariant | str, *, seed: int) -> Sam:
    """A SAM of this variant with random weights drawn from `seed` (the global torch RNG is untouched)."""
    builder = SAM_BUILDERS[_variant(variant)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


def write_random_sam(path: Path | str, variant: SamVariant | str, *, seed: int) -> Path:
    """Save a random SAM's state dict in the public checkpoint format (torch.save of the state dict, as
    sam_vit_b_01ec64.pth is). Returns the path."""
    path = Path(path)
    torch.save(random_sam(variant, seed=seed).state_dict(), path)
    return path


def _examples(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(sorted(names)[:n]) + (", ..." if len(names) > n else "")


def _check_keys(model: Sam, state: Mapping[str, torch.Tensor], path: Path, variant: SamVariant) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": wrong_shape}
    problems = [f"{len(names)} {what} ({_examples(names)})" for what, names in found.items() if names]
    if problems:
        raise ConfigError(
            f"SAM checkpoint {path} does not fit variant {variant}: {'; '.join(problems)} "
            "(a checkpoint of another variant?)"
        )


def load_sam(variant: SamVariant | str, checkpoint: Path | str | None, *, device: str = "cpu") -> Sam:
    """SAM of `variant` with the weights of `checkpoint` (a torch.save'd state dict such as
    sam_vit_b_01ec64.pth), in eval mode on `device`. checkpoint None: random weights (tests only).

    Raises ConfigError naming the file when it is missing, holds anything but tensors (WeightsError,
    from mcs_batch.models.weights.load_state_dict), or does not match the variant's parameters
    exactly (missing, unexpected or mis-shaped keys).
    """
    variant = _variant(variant)
    model = SAM_BUILDERS[variant]()
    if checkpoint is not None:
        path = Path(checkpoint)
        state = load_state_dict(path)  # tensors only: refuses pickled code and custom objects
        _check_keys(model, state, path, variant)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# -- the image encoder's attention, fused -------------------------------------------------------


def _fused_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's Attention.forward, the same arithmetic up to float rounding, with softmax(QK^T *
    scale + relative-position bias) V computed by F.scaled_dot_product_attention: the decomposed
    relative-position terms (rel_h, rel_w) are broadcast into an additive bias instead of being added
    to a materialised attention matrix that softmax then reads and writes again.

    On CPU the queries go one row of the token grid at a time, so each row's bias ([heads, W, H * W],
    1 MB for 2 heads) is built and consumed while it is in cache instead of a [heads, HW, HW] tensor
    written to and read back from memory (128 MB for 2 heads, 768 MB for vit_b's 12). Measured on
    this CPU, one thread, a global block of 4096 tokens: tiny SAM 344 -> 209 ms (one bias) -> 90 ms
    (row by row); vit_b's width 2,613 -> 1,776 -> 1,264 ms. On CUDA one call: the fused kernels never
    hold the [heads, 4096, 4096] probabilities, and 64 small launches would cost more than the bias."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # [B * heads, HW, head_dim]
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    else:
        r_q = q.reshape(-1, h, w, q.shape[-1])
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        rows = h if x.device.type == "cuda" else 1
        out = torch.empty_like(q)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            bias = rel_h[:, r0:r1, :, :, None] + rel_w[:, r0:r1, :, None, :]  # [B * heads, rows, W, H, W]
            bias = bias.reshape(q.shape[0], (r1 - r0) * w, h * w).to(q.dtype)
            out[:, r0 * w : r1 * w] = F.scaled_dot_product_attention(
                q[:, r0 * w : r1 * w], k, v, attn_mask=bias, scale=self.scale
            )
    return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


@contextlib.contextmanager
def fused_attention(encoder: ImageEncoderViT) -> Iterator[None]:
    """Within the block, the encoder's attention modules compute with `_fused_attention_forward`; the
    model itself is left as segment_anything built it (so SamPredictor on the same model is the
    reference the tests compare with)."""
    modules = [block.attn for block in encoder.blocks if isinstance(block.attn, Attention)]
    for module in modules:
        module.forward = types.MethodType(_fused_attention_forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


# -- batched inference ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SamEmbeddings:
    """Image embeddings of a batch, with what is needed to map masks back to each image.

    features: float32 [B, 256, 64, 64] on the model's device.
    original_sizes: (H, W) of each image; input_sizes: (h, w) after ResizeLongestSide (before padding).
    """

    features: torch.Tensor
    original_sizes: tuple[tuple[int, int], ...]
    input_sizes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.original_sizes)


@dataclass(frozen=True)
class SamResult:
    """SAM's mask for one image and one target.

    mask: bool [H, W], image frame: union of the per-box masks, then the K largest components.
    score: SAM's predicted IoU, mean over the prompts (boxes); 0.0 when there was no prompt.
    per_box_scores: float32 [N], SAM's predicted IoU per box (one entry for a points-only prompt).
    """

    mask: np.ndarray
    score: float
    per_box_scores: np.ndarray


def _check_image(image: np.ndarray, i: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image {i}: expected RGB uint8 [H, W, 3], got {image.dtype} with shape {image.shape}")
    return image


def _as_array(values, columns: int, what: str) -> np.ndarray:
    array = np.zeros((0, columns)) if values is None else np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, columns))
    if array.ndim != 2 or array.shape[1] != columns or not np.isfinite(array).all():
        raise ValueError(f"{what}: expected finite [N, {columns}] pixel coordinates, got shape {array.shape}")
    return array


class SamSegmenter:
    """Box- (and point-) prompted SAM masks for batches of images; holds one model.

    fp32 everywhere on CPU; on CUDA the image encoder may run under bf16 / fp16 autocast (the decoder
    stays fp32). Embed a batch once, then segment as many targets per image as needed.

    Memory grows with the batch: segment_anything's global-attention blocks hold [heads, 4096, 4096]
    attention matrices per image (vit_b fp32 on CPU: ~11 GiB peak for a batch of 4, ~2.5 GiB per
    image, measured before `fused_attention`, whose relative-position bias is of that size too); size
    batches to the machine. On this 2-core CPU batching gave about no speed-up (the
    encoder is compute-bound); the gain is expected on GPUs.
    """

    def __init__(self, model: Sam, *, precision: Precision | str = Precision.FP32):
        try:
            precision = Precision(precision)
        except ValueError as e:
            raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(Precision)}") from e
        if precision is not Precision.FP32 and model.device.type != "cuda":
            raise ConfigError(f"precision {precision} needs a CUDA device; the model is on {model.device}")
        self.model = model.eval()
        self.precision = precision
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @classmethod
    def load(
        cls,
        variant: SamVariant | str,
        checkpoint: Path | str | None,
        *,
        device: str = "cpu",
        precision: Precision | str = Precision.FP32,
    ) -> SamSegmenter:
        return cls(load_sam(variant, checkpoint, device=device), precision=precision)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> SamEmbeddings:
        """Embed RGB uint8 [H, W, 3] images (sizes may differ) with ONE image-encoder call."""
        if len(images) == 0:
            raise ValueError("embed: no images")
        inputs, original_sizes, input_sizes = [], [], []
        for i, image in enumerate(images):
            image = _check_image(image, i)
            resized = torch.from_numpy(self.transform.apply_image(image))
            if self.device.type == "cuda":  # page-locked host memory: an asynchronous copy
                resized = resized.pin_memory().to(self.device, non_blocking=True)
            resized = resized.permute(2, 0, 1).contiguous()[None]
            inputs.append(self.model.preprocess(resized))  # normalise, pad to 1024 x 1024
            original_sizes.append((int(image.shape[0]), int(image.shape[1])))
            input_sizes.append((int(resized.shape[-2]), int(resized.shape[-1])))
        batch = torch.cat(inputs)
        with fused_attention(self.model.image_encoder):
            if self.precision is Precision.FP32:
                features = self.model.image_encoder(batch)
            else:
                dtype = torch.bfloat16 if self.precision is Precision.BF16 else torch.float16
                with torch.autocast(device_type="cuda", dtype=dtype):
                    features = self.model.image_encoder(batch)
        return SamEmbeddings(features.float(), tuple(original_sizes), tuple(input_sizes))

    @torch.inference_mode()
    def segment(
        self,
        embeddings: SamEmbeddings,
        index: int,
        boxes_xyxy: np.ndarray,
        points_xy: np.ndarray | None = None,
        *,
        k_components: int | None = 1,
    ) -> SamResult:
        """The mask of one target on image `index` of `embeddings`.

        boxes_xyxy: [N, 4] XYXY pixel coordinates in the image's own frame, N >= 0; all boxes go
            through the decoder at once (multimask_output=False), masks = logits > 0 upsampled to
            (H, W), then their union. N = 0 and no points: an empty mask.
        points_xy: optional [P, 2] (x, y) positive points. With boxes they join every box prompt (the
            reference's "both" mode); without boxes they form one prompt on their own.
        k_components: keep the K largest 8-connected components of the union; None keeps all.
        """
        if not 0 <= index < len(embeddings):
            raise IndexError(f"segment: image index {index} outside a batch of {len(embeddings)}")
        size, input_size = embeddings.original_sizes[index], embeddings.input_sizes[index]
        boxes = _as_array(boxes_xyxy, 4, "boxes_xyxy")
        points = _as_array(points_xy, 2, "points_xy")
        if len(boxes) == 0 and len(points) == 0:
            return SamResult(np.zeros(size, dtype=bool), 0.0, np.zeros(0, dtype=np.float32))

        n_prompts = max(len(boxes), 1)
        box_input, point_input = None, None
        if len(boxes):
            box_input = self._tensor(self.transform.apply_boxes(boxes, size))
        if len(points):
            coords = self._tensor(self.transform.apply_coords(points, size))
            labels = torch.ones(len(points), dtype=torch.int, device=self.device)
            point_input = (coords[None].expand(n_prompts, -1, -1), labels[None].expand(n_prompts, -1))
        sparse, dense = self.model.prompt_encoder(points=point_input, boxes=box_input, masks=None)
        low_res_logits, iou = self.model.mask_decoder(
            image_embeddings=embeddings.features[index : index + 1],
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = self.model.postprocess_masks(low_res_logits, input_size, size)  # [N, 1, H, W]
        union = (logits > self.model.mask_threshold).any(dim=0)[0].cpu().numpy()
        if k_components is not None:
            union = largest_components(union, k_components)
        scores = iou[:, 0].float().cpu().numpy()
        return SamResult(union, float(scores.mean()), scores)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float, device=self.device)
