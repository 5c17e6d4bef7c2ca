"""What trains and how fast: tower selection, AdamW parameter groups, warm-up + cosine schedule.

Towers of the open_clip BiomedCLIP (CustomTextCLIP):
    vision      `visual.*`  (timm ViT trunk + linear projection head `visual.head.*`)
    text        `text.*`    (HF BERT `text.transformer.*` + MLP projection `text.proj.*`)
    projection  `visual.head.*` and `text.proj.*` only
    both        vision and text
`logit_scale` (and `logit_bias`) never train: the loss has its own fixed temperature.
"""

from __future__ import annotations

import math

from mcs_batch.errors import ConfigError

PROJECTION_PREFIXES = ("visual.head.", "text.proj.")
TOWER_PREFIXES = {
    "both": ("visual.", "text."),
    "vision": ("visual.",),
    "text": ("text.",),
    "projection": PROJECTION_PREFIXES,
}


def select_trainable(model, towers: str) -> list[str]:
    """Set requires_grad on the chosen towers' parameters only; returns their names (sorted).

    Frozen sub-towers are put in eval mode by `set_train_mode` (no dropout noise in frozen features).
    """
    if towers not in TOWER_PREFIXES:
        raise ConfigError(f"optim.towers: {towers!r} is not one of {', '.join(TOWER_PREFIXES)}")
    prefixes = TOWER_PREFIXES[towers]
    names = []
    for name, parameter in model.named_parameters():
        train = name.startswith(prefixes)
        parameter.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ConfigError(f"optim.towers={towers}: no parameter of this model matches {prefixes}")
    return sorted(names)


def set_train_mode(model, towers: str) -> None:
    """model.train(), with the frozen parts (trunks, whole towers) back in eval mode."""
    model.train()
    if towers == "vision":
        model.text.eval()
    elif towers == "text":
        model.visual.eval()
    elif towers == "projection":
        model.visual.trunk.eval()
        model.text.transformer.eval()


def parameter_groups(model, *, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on trainable tensors of 2+ dimensions; none on biases, norms, scalars."""
    decay, no_decay = [], []
    for _, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up from 1/(warmup+1)
    to 1 over `warmup_steps`, then a half cosine down to `min_lr_ratio` at `total_steps`; flat after."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(train_pairs: int, *, num_workers: int, worker_batch_size: int) -> int:
    """Optimizer steps in one epoch: every worker gets floor(N / W) pairs (Ray Train's equal split),
    in batches of worker_batch_size, the last one partial."""
    per_worker = train_pairs // num_workers
    return math.ceil(per_worker / worker_batch_size)
