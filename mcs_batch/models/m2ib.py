"""M2IB saliency (multi-modal information bottleneck, vision side) for a timm ViT image tower.

The method (see METHOD.md, step 3): R is the output of ViT block `layer` (all tokens, CLS included).
A learnable alpha of R's shape gives lambda = sigmoid(alpha); Z = lambda * R + (1 - lambda) * eps,
eps ~ N(0, 1), goes through the rest of the tower to an image embedding f(Z). Adam on alpha minimises
    beta * mean(KL) - mean over samples of cos(f(Z), t),
    KL = -0.5 * (1 + log((1 - lambda)^2) - (lambda * R)^2 - (1 - lambda)^2)   (per element).
The saliency is the KL of the last forward pass, summed over channels, on the patch grid, upsampled.

Two modes give the same map:
- "fast": blocks 0..layer run once without gradients (`vision_prefix`); each step runs only the blocks
  after `layer` with gradients for alpha alone; a batch of images is one batched problem (one alpha
  per image, losses summed so each image's gradient is what it would be alone; Adam is elementwise);
  the last step needs only the KL, so the network is not run for it; with token pooling the last
  block is computed for the CLS token only (its other outputs are never read).
- "reference": what the public code does, one image at a time: the whole tower forward and backward
  every step with weight gradients, the bottleneck injected by a forward hook at block `layer`, the
  text optionally re-encoded every step, and a last backward / Adam step whose result is thrown away.

Noise contract (mcs_batch.seeding): each image has its own CPU `torch.Generator`; at every step
`torch.randn((samples, tokens, width), generator=g)` is drawn, steps in order, in both modes (the fast
mode draws the last step's tensor too, so the generator ends in the same state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcs_batch.errors import ConfigError
from mcs_batch.models.settings import M2IBMode, M2IBSettings, Precision

_AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


TextEncoder = Callable[[int], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# The tower and its parts
# --------------------------------------------------------------------------------------------------


def _tower_parts(visual: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(timm VisionTransformer trunk, open_clip projection head) of an open_clip TimmModel."""
    from timm.models.vision_transformer import VisionTransformer

    trunk = getattr(visual, "trunk", None)
    head = getattr(visual, "head", None)
    if not isinstance(trunk, VisionTransformer) or not isinstance(head, nn.Module):
        raise TypeError(
            f"M2IB needs an open_clip TimmModel image tower (timm VisionTransformer trunk + head), "
            f"got {type(visual).__name__} with trunk {type(trunk).__name__}"
        )
    return trunk, head


def _check_layer(trunk: nn.Module, layer: int) -> None:
    depth = len(trunk.blocks)
    if not 0 <= layer < depth:
        raise ConfigError(f"m2ib layer {layer}: the image tower has blocks 0..{depth - 1}")


def _grid(trunk: nn.Module) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(image size (H, W), patch grid (h, w), number of prefix tokens) of the trunk."""
    pe = trunk.patch_embed
    return tuple(pe.img_size), tuple(pe.grid_size), int(trunk.num_prefix_tokens)


def _autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ConfigError(f"m2ib precision {precision.value} needs a CUDA device; on {device.type} use fp32")
    return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[precision])


@contextlib.contextmanager
def _model_state(module: nn.Module, *, requires_grad: bool) -> Iterator[None]:
    """Eval mode and the given requires_grad on every parameter; restores flags, grads and mode."""
    params = list(module.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = module.training
    module.eval()
    for p in params:
        p.requires_grad_(requires_grad)
        p.grad = None
    try:
        yield
    finally:
        for p, (flag, grad) in zip(params, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        module.train(was_training)


def _first_token_pooled(trunk: nn.Module) -> bool:
    """True when the embedding reads only token 0 after the last block (timm global_pool='token')."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    last = trunk.blocks[-1]
    return (
        trunk.global_pool == "token"
        and getattr(trunk, "attn_pool", None) is None
        and trunk.num_prefix_tokens >= 1
        and type(last) is Block
        and type(last.attn) is Attention
    )


def _block_first_token(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT Block's output for token 0 only, [N, 1, C]: keys / values from all tokens."""
    attn = block.attn
    n, t, c = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    xn = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(xn[:, :1], weight[:c], None if bias is None else bias[:c])
    kv = F.linear(xn, weight[c:], None if bias is None else bias[c:])
    q = q.reshape(n, 1, heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(n, t, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v)  # eval mode: no attention dropout
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(n, 1, c))))
    y = x[:, :1] + block.drop_path1(block.ls1(o))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def _tail(visual: nn.Module, z: torch.Tensor, layer: int) -> torch.Tensor:
    """Image embedding [N, D] from block `layer`'s output z [N, T, C]: later blocks, norm, pool, head."""
    trunk, head = _tower_parts(visual)
    blocks = list(trunk.blocks)[layer + 1 :]
    last = len(blocks) - 1 if _first_token_pooled(trunk) else -1  # block run for token 0 only
    for i, block in enumerate(blocks):
        z = _block_first_token(block, z) if i == last else block(z)
    return head(trunk.forward_head(trunk.norm(z)))


# --------------------------------------------------------------------------------------------------
# Shared arithmetic
# --------------------------------------------------------------------------------------------------


def _kl(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL[N(mu, var) || N(0, 1)] per element, as the reference computes it."""
    return -0.5 * (1 + torch.log(var) - mu**2 - var)


def _noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """[B, *shape] standard normal, one draw per image from its own generator, on the generator's
    device (a CUDA generator draws on the GPU: no CPU time, see mcs_batch.seeding)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def _kl_to_saliency(kl: torch.Tensor, trunk: nn.Module) -> torch.Tensor:
    """KL [B, T, C] (mean over samples) -> saliency float32 [B, H, W] in [0, 1], tower input frame."""
    image_size, (gh, gw), prefix = _grid(trunk)
    b = kl.shape[0]
    s = torch.nansum(kl.float(), dim=-1)[:, prefix:].reshape(b, 1, gh, gw)
    s = F.interpolate(s, size=image_size, mode="bilinear", align_corners=False)[:, 0]
    lo = s.amin(dim=(1, 2), keepdim=True)
    span = s.amax(dim=(1, 2), keepdim=True) - lo
    ok = torch.isfinite(span) & (span > 0)
    out = torch.where(ok, (s - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(s))
    return out.clamp_(0.0, 1.0)


def _check_batch(r_or_images: torch.Tensor, text_embeddings: torch.Tensor, generators: Sequence) -> int:
    b = r_or_images.shape[0]
    if text_embeddings.ndim != 2 or text_embeddings.shape[0] != b:
        raise ValueError(f"text_embeddings: expected [{b}, D], got {list(text_embeddings.shape)}")
    if len(generators) != b:
        raise ValueError(f"generators: expected one per image ({b}), got {len(generators)}")
    return b


def _check_images(trunk: nn.Module, images: torch.Tensor) -> None:
    (h, w), _, _ = _grid(trunk)
    channels = trunk.patch_embed.proj.in_channels
    if images.ndim != 4 or tuple(images.shape[1:]) != (channels, h, w):
        raise ValueError(f"images: expected [B, {channels}, {h}, {w}], got {list(images.shape)}")


# --------------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def vision_prefix(visual: nn.Module, images: torch.Tensor, settings: M2IBSettings | None = None) -> torch.Tensor:
    """R = output of block `settings.layer`, float32 [B, T, C] (T tokens incl. CLS), no gradients.

    images: float [B, 3, H, W], normalised for the tower (BiomedCLIP: 224x224, CLIP mean / std).
    Run once per image; every target (text) on that image reuses R (index or repeat it along B).
    """
    settings = settings or M2IBSettings()
    trunk, _ = _tower_parts(visual)
    _check_layer(trunk, settings.layer)
    _check_images(trunk, images)
    with _model_state(visual, requires_grad=False), _autocast(images.device, settings.precision):
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
        for block in list(trunk.blocks)[: settings.layer + 1]:
            x = block(x)
    return x.float()


def m2ib_from_prefix(
    visual: nn.Module,
    R: torch.Tensor,
    text_embeddings: torch.Tensor,
    generators: Sequence[torch.Generator],
    settings: M2IBSettings | None = None,
) -> torch.Tensor:
    """M2IB saliency from block outputs R [B, T, C] (see `vision_prefix`), one alpha per image.

    text_embeddings: float [B, D], image b's target embedding (L2-normalised; cosine is scale-free).
    generators: one CPU generator per image (mcs_batch.seeding.torch_generator).
    Returns saliency float32 [B, H, W] in [0, 1] (H, W the tower's input size), on R's device;
    a constant map becomes all zeros.
    """
    settings = settings or M2IBSettings()
    trunk, _ = _tower_parts(visual)
    _check_layer(trunk, settings.layer)
    _, (gh, gw), prefix = _grid(trunk)
    b = _check_batch(R, text_embeddings, generators)
    if R.ndim != 3 or R.shape[1] != prefix + gh * gw or R.shape[2] != trunk.embed_dim:
        raise ValueError(f"R: expected [B, {prefix + gh * gw}, {trunk.embed_dim}], got {list(R.shape)}")
    _, tokens, width = R.shape
    samples = settings.samples
    device = R.device
    R = R.detach().float()
    text = text_embeddings.detach().to(device=device, dtype=torch.float32)[:, None, :]  # [B, 1, D]

    alpha = torch.full_like(R, settings.alpha_init, requires_grad=True)  # [B, T, C]
    optimizer = torch.optim.Adam([alpha], lr=settings.lr)
    with _model_state(visual, requires_grad=False):
        for step in range(settings.steps):
            noise = _noise(generators, (samples, tokens, width), device)  # [B, S, T, C]
            if step == settings.steps - 1:
                break  # the last forward is read only for its KL, which does not depend on the noise
            optimizer.zero_grad(set_to_none=True)
            lam = torch.sigmoid(alpha)
            mu, var = lam * R, (1 - lam) ** 2
            compression = _kl(mu, var).mean(dim=(1, 2))  # [B]
            z = (mu[:, None] + var.sqrt()[:, None] * noise).reshape(b * samples, tokens, width)
            with _autocast(device, settings.precision):
                features = _tail(visual, z, settings.layer)
            features = features.float().reshape(b, samples, -1)
            fitting = F.cosine_similarity(features, text, dim=-1, eps=settings.cos_eps).mean(dim=1)
            (settings.beta * compression - fitting).sum().backward()
            optimizer.step()
    with torch.no_grad():
        lam = torch.sigmoid(alpha)
        kl = _kl(lam * R, (1 - lam) ** 2)
    return _kl_to_saliency(kl, trunk)


# --------------------------------------------------------------------------------------------------
# Reference path
# --------------------------------------------------------------------------------------------------


def _reference_one(
    visual: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Generator,
    settings: M2IBSettings,
    encode_text: Callable[[], torch.Tensor] | None,
) -> torch.Tensor:
    """The public code's loop for one image; returns the last forward's KL, mean over samples [T, C]."""
    trunk, _ = _tower_parts(visual)
    samples, device = settings.samples, image.device
    _, (gh, gw), prefix = _grid(trunk)
    shape = (samples, prefix + gh * gw, trunk.embed_dim)
    alpha = nn.Parameter(torch.full((1, *shape[1:]), settings.alpha_init, device=device))
    optimizer = torch.optim.Adam([alpha], lr=settings.lr)
    captured: dict[str, torch.Tensor] = {}

    def bottleneck(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(alpha).expand(output.shape[0], output.shape[1], -1)
        mu, var = output.float() * lam, (1 - lam) ** 2
        captured["kl"] = _kl(mu, var)
        return mu + var.sqrt() * torch.randn(shape, generator=generator).to(device)

    batch = image[None].expand(samples, -1, -1, -1)
    handle = trunk.blocks[settings.layer].register_forward_hook(bottleneck)
    try:
        for _ in range(settings.steps):
            optimizer.zero_grad()
            with _autocast(device, settings.precision):
                target = text if encode_text is None else encode_text()
                features = visual(batch)
            target = target.float().reshape(-1, features.shape[-1]).expand(samples, -1)
            fitting = F.cosine_similarity(target, features.float(), eps=settings.cos_eps).mean()
            loss = settings.beta * captured["kl"].mean() - fitting
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
    return captured["kl"].detach().mean(dim=0)


def m2ib_saliency(
    visual: nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    generators: Sequence[torch.Generator],
    settings: M2IBSettings | None = None,
    *,
    mode: M2IBMode | str = M2IBMode.FAST,
    text_encoder: TextEncoder | None = None,
) -> torch.Tensor:
    """M2IB saliency maps, one per (image, target) pair.

    visual: open_clip TimmModel image tower (BiomedCLIP's `model.visual`).
    images: float [B, 3, H, W], normalised for the tower (BiomedCLIP: 224x224).
    text_embeddings: float [B, D], image b's target embedding (L2-normalised).
    generators: one CPU generator per image (mcs_batch.seeding.torch_generator).
    mode: "fast" (default) or "reference" (the public code's full loop; for checks and benchmarks).
    text_encoder: reference mode only; `text_encoder(b)` is called at every step and returns image b's
        target embedding ([D] or [samples, D]) computed with gradients, as the public code re-encodes
        the text; without it the reference mode uses text_embeddings.
    Returns saliency float32 [B, H, W] in [0, 1], tower input frame, on the images' device.
    """
    settings = settings or M2IBSettings()
    try:
        mode = M2IBMode(mode)
    except ValueError as e:
        choices = ", ".join(m.value for m in M2IBMode)
        raise ConfigError(f"m2ib mode {mode!r}: expected one of {choices}") from e
    trunk, _ = _tower_parts(visual)
    _check_layer(trunk, settings.layer)
    _check_images(trunk, images)
    b = _check_batch(images, text_embeddings, generators)
    if mode is M2IBMode.FAST:
        if text_encoder is not None:
            raise ValueError("text_encoder is used by mode='reference' only; pass text_embeddings")
        R = vision_prefix(visual, images, settings)
        return m2ib_from_prefix(visual, R, text_embeddings, generators, settings)

    kls = []
    with _model_state(visual, requires_grad=True):
        for i in range(b):
            encode = None if text_encoder is None else (lambda i=i: text_encoder(i))
            text = text_embeddings[i].detach().to(device=images.device, dtype=torch.float32)
            kls.append(_reference_one(visual, images[i], text, generators[i], settings, encode))
    return _kl_to_saliency(torch.stack(kls), trunk)
