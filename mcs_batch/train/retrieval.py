"""Cross-modal retrieval accuracy (METHOD.md's evaluation of the fine-tuned BiomedCLIP).

Image -> text: for each image, rank every caption of the set by cosine similarity; a hit at k when a
caption among the top k is the image's own caption. Text -> image: the same with the roles swapped.
"Its own caption" is compared by text: captions that are identical strings are interchangeable (no
model can tell them apart), so a set in which several images share a caption is scored fairly. With
unique captions this is the usual index-matching top-k accuracy.

`chance_top1` is the expected top-1 accuracy of a random ranking: mean over queries of
(number of items with the query's caption) / N.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_metrics(image_features, text_features, captions: Sequence[str], *, ks: Sequence[int] = (1, 2)) -> dict:
    """{"i2t_top1", "i2t_top2", "t2i_top1", "t2i_top2", "n", "chance_top1"} as fractions in [0, 1].

    image_features, text_features: float [N, D] (tensors or arrays), row i of each is pair i;
    normalised here. captions: the N caption strings (defines which items are interchangeable).
    """
    import torch
    import torch.nn.functional as F

    images = F.normalize(torch.as_tensor(image_features).float(), dim=-1)
    texts = F.normalize(torch.as_tensor(text_features).float(), dim=-1)
    n = images.shape[0]
    if texts.shape[0] != n or len(captions) != n:
        raise ValueError(f"need as many images, texts and captions, got {n}, {texts.shape[0]}, {len(captions)}")
    if n == 0:
        raise ValueError("retrieval metrics need at least one pair")
    _, group = np.unique(np.asarray([str(c) for c in captions], dtype=object), return_inverse=True)
    group = torch.as_tensor(group)
    same = group[:, None] == group[None, :]  # [N, N]: item j is a correct answer for query i
    similarity = images @ texts.T  # [N images, N texts]
    out: dict = {"n": int(n), "chance_top1": float(same.float().mean(dim=1).mean())}
    for name, sim in (("i2t", similarity), ("t2i", similarity.T)):
        order = torch.argsort(sim, dim=1, descending=True)
        hit_at = torch.gather(same, 1, order)  # [N, N]: is the r-th ranked item correct
        for k in ks:
            out[f"{name}_top{k}"] = float(hit_at[:, : min(k, n)].any(dim=1).float().mean())
    return out
