"""Contrastive losses for image-caption pairs: DHN-NCE (METHOD.md) and the losses it is compared with.

All four are one formula with two switches. With L2-normalised embeddings I (images) and T (texts),
s_ik = <I_i, T_k>, temperature tau and B the actual size of the batch (the last, partial one too):

    L     = L_v2t + L_t2v
    L_v2t = -(1/B) sum_i log( exp(s_ii/tau) / (p * exp(s_ii/tau) + sum_{k != i} w_ik exp(s_ik/tau)) )
    w_ik  = (B - 1) * exp(beta1 * s_ik/tau) / sum_{j != i} exp(beta1 * s_ij/tau)

L_t2v is the same on the transposed similarity matrix with beta2. The variants:

    kind      positive in denominator (p)   hard-negative weights (beta)
    dhn_nce   no  (p = 0, "decoupled")       beta1, beta2   <- the method (METHOD.md)
    hn_nce    yes (p = 1)                    beta1, beta2
    dcl       no  (p = 0)                    none (w_ik = 1)
    infonce   yes (p = 1)                    none: the CLIP loss, summed over both directions

With beta = 0 every weight is exactly 1. The weights are part of the formula (not detached).
Computed in log space: log sum_{k != i} w_ik exp(s_ik/tau)
    = log(B - 1) + logsumexp_{k != i}((1 + beta) s_ik/tau) - logsumexp_{j != i}(beta s_ij/tau).

Distributed training: with `gather=True` (the default) and torch.distributed initialised, the
embeddings of every worker are gathered with gradients (`all_gather_with_grad`), so that the negatives
span the global batch and every worker computes the same global loss. Under DDP (which averages
gradients over workers) the resulting parameter gradient is exactly the single-process gradient of
the loss on the global batch: the gather's backward sums the gradient of each worker's copy of the
loss, which cancels DDP's division by the world size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mcs_batch.train.config import LossKind

# kind -> (positive pair in the denominator, hard-negative weighting)
_VARIANTS: dict[LossKind, tuple[bool, bool]] = {
    LossKind.DHN_NCE: (False, True),
    LossKind.HN_NCE: (True, True),
    LossKind.DCL: (False, False),
    LossKind.INFONCE: (True, False),
}


def one_direction(similarity: torch.Tensor, *, temperature: float, beta: float, positive_in_denominator: bool):
    """-(1/B) sum_i log(exp(s_ii/tau) / (p exp(s_ii/tau) + sum_{k != i} w_ik exp(s_ik/tau))), rows = queries.

    similarity: float [B, B], s[i, k] = <query_i, key_k>, the positive pairs on the diagonal; B >= 2.
    Returns a float scalar (differentiable).
    """
    b = similarity.shape[0]
    if similarity.ndim != 2 or similarity.shape[1] != b:
        raise ValueError(f"similarity must be a square [B, B] matrix, got {tuple(similarity.shape)}")
    if b < 2:
        raise ValueError(f"a contrastive loss needs at least 2 pairs in a batch (no negatives with B = {b})")
    logits = similarity / temperature
    positive = torch.diagonal(logits)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=similarity.device)
    neg_inf = torch.finfo(logits.dtype).min
    # log sum_{k != i} w_ik exp(s_ik / tau), w_ik as in the module docstring (beta = 0: w_ik = 1).
    negatives = torch.logsumexp(((1.0 + beta) * logits).masked_fill(~off_diagonal, neg_inf), dim=1)
    negatives = (
        negatives + math.log(b - 1) - torch.logsumexp((beta * logits).masked_fill(~off_diagonal, neg_inf), dim=1)
    )
    denominator = torch.logaddexp(negatives, positive) if positive_in_denominator else negatives
    return (denominator - positive).mean()


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-shaped [n, D] tensors whose backward hands each worker the gradient of its
    own rows summed over every worker's graph (an all-reduce of the gathered gradient, then the
    worker's slice). Public collectives only, so it runs on gloo (CPU) and NCCL alike."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` from every worker, in rank order, with gradients flowing back to each worker's rows.

    x: float [b_r, D] on this worker (b_r may differ between workers: the last batch of a shard).
    Returns float [sum_r b_r, D]. Without an initialised process group (or with one worker) returns x.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0])) if x.shape[0] < longest else x
    gathered = _GatherRows.apply(padded)
    return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(sizes)], dim=0)


class ContrastiveLoss(nn.Module):
    """`loss(image_features, text_features)` -> float scalar, for one of the kinds above.

    image_features, text_features: float [B, D], L2-normalised, row i of each is a positive pair.
    temperature: tau > 0. beta1 (image -> text rows) and beta2 (text -> image rows): >= 0, used by
    the hard-negative kinds only. gather: all-gather the embeddings across workers first.
    """

    def __init__(
        self,
        kind: LossKind | str = LossKind.DHN_NCE,
        *,
        temperature: float = 0.6,
        beta1: float = 0.15,
        beta2: float = 0.15,
        gather: bool = True,
    ):
        super().__init__()
        try:
            self.kind = LossKind(kind)
        except ValueError as e:
            raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(k.value for k in LossKind)}") from e
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if beta1 < 0 or beta2 < 0:
            raise ValueError(f"beta1 and beta2 must be >= 0, got {beta1}, {beta2}")
        self.positive_in_denominator, hard_negatives = _VARIANTS[self.kind]
        self.temperature = float(temperature)
        self.beta1 = float(beta1) if hard_negatives else 0.0
        self.beta2 = float(beta2) if hard_negatives else 0.0
        self.gather = gather

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"expected image and text features of one shape [B, D], got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        if self.gather:
            image_features = all_gather_with_grad(image_features)
            text_features = all_gather_with_grad(text_features)
        dtype = torch.promote_types(image_features.dtype, torch.float32)  # bf16 / fp16 (AMP) -> float32
        similarity = image_features.to(dtype) @ text_features.to(dtype).T
        p = self.positive_in_denominator
        v2t = one_direction(similarity, temperature=self.temperature, beta=self.beta1, positive_in_denominator=p)
        t2v = one_direction(similarity.T, temperature=self.temperature, beta=self.beta2, positive_in_denominator=p)
        return v2t + t2v

    def extra_repr(self) -> str:
        return f"kind={self.kind.value}, temperature={self.temperature}, beta1={self.beta1}, beta2={self.beta2}"

    def describe(self) -> dict:
        """The loss and its parameters, for the model card."""
        return {
            "kind": self.kind.value,
            "temperature": self.temperature,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "positive_in_denominator": self.positive_in_denominator,
            "directions": "image->text + text->image (summed)",
        }


class DHNNCELoss(ContrastiveLoss):
    """DHN-NCE (METHOD.md): decoupled hard-negative noise-contrastive estimation. Defaults tau = 0.6,
    beta1 = beta2 = 0.15."""

    def __init__(self, temperature: float = 0.6, beta1: float = 0.15, beta2: float = 0.15, *, gather: bool = True):
        super().__init__(LossKind.DHN_NCE, temperature=temperature, beta1=beta1, beta2=beta2, gather=gather)


def make_loss(kind: LossKind | str, *, temperature: float, beta1: float, beta2: float) -> ContrastiveLoss:
    """The loss of a finetune config (all kinds through one constructor)."""
    return ContrastiveLoss(kind, temperature=temperature, beta1=beta1, beta2=beta2)
