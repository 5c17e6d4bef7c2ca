"""M2IB saliency cost per image: the public code's loop (mode="reference") vs the fast path.

    .venv/bin/python bench/m2ib_bench.py                          # BiomedCLIP size, 2 images, 2 threads
    .venv/bin/python bench/m2ib_bench.py --images 8 --threads 2 --batch-sizes 1,8
    .venv/bin/python bench/m2ib_bench.py --size tiny --images 3   # smoke test in seconds

The model is a random-weight BiomedCLIP (size "base": ViT-B/16 + BERT-base, 196 M parameters) written
to a temporary folder (or --model-dir, reused when it already holds one). Images are random, the
targets are prompt embeddings. Same settings and seeds for every path.

- reference: one image at a time, the whole tower forward and backward every step with every weight's
  gradient, and the text tower re-run with gradients every step on `samples` copies of the prompt, as
  the public code does. Its tokens are cut to the prompt's own length as the public code's tokenizer
  call leaves them (--pad-text: padded to BiomedCLIP's 256, as open_clip's tokenizer gives them).
- fast, batch size k: vision prefix once, alpha-only gradients past `layer`, k images per call (the
  image list is extended with more random images when it has fewer than k).

Prints seconds per image for each path, the reference / fast ratio, and the max abs difference
between the reference's maps and each fast path's maps (same images, targets and seeds).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mcs_batch.models.biomedclip import load_biomedclip
from mcs_batch.models.m2ib import M2IBSettings, m2ib_saliency
from mcs_batch.models.open_clip_folder import read_marker
from mcs_batch.models.tiny import write_tiny_biomedclip
from mcs_batch.seeding import torch_generator

PROMPTS = (
    "a breast tumor in an ultrasound image",
    "a brain tumor in a t1 weighted mri",
    "lungs in a chest x-ray",
    "a hypoechoic mass with irregular margins",
)


def _model(size: str, model_dir: str | None, seed: int):
    if model_dir:
        folder = Path(model_dir)
        marker = read_marker(folder)
        if marker is None or marker.get("size") != size or marker.get("seed") != seed:
            write_tiny_biomedclip(folder, seed=seed, size=size)
        return load_biomedclip(folder)
    with tempfile.TemporaryDirectory(prefix="m2ib-bench-") as tmp:
        return load_biomedclip(write_tiny_biomedclip(Path(tmp) / size, seed=seed, size=size))


def _images(clip, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        image[64:160, 96:224] = rng.integers(0, 256, 3)  # a flat block, so that maps have structure
        images.append(image)
    pixels, _ = clip.to_clip_input(images, "resize")
    return pixels


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch_generator(seed, "bench", i) for i in range(n)]


def _text_encoder(clip, prompts: list[str], samples: int, pad: bool):
    """text_encoder(i): prompt i's features [samples, D], with gradients, from its token ids."""
    pad_id = clip.model.text.config.pad_token_id
    tokens = []
    for prompt in prompts:
        ids = clip.tokenize([prompt] * samples)
        if not pad:
            ids = ids[:, : int((ids[0] != pad_id).sum())]
        tokens.append(ids)
    return lambda i: clip.model.encode_text(tokens[i])


def _reference(clip, pixels, targets, prompts, settings, seed, pad_text):
    encode = _text_encoder(clip, prompts, settings.samples, pad_text)
    clip.model.requires_grad_(True)  # the public code computes gradients for the text weights too
    try:
        start = time.perf_counter()
        maps = m2ib_saliency(
            clip.model.visual,
            pixels,
            targets,
            _generators(len(pixels), seed),
            settings,
            mode="reference",
            text_encoder=encode,
        )
        seconds = time.perf_counter() - start
    finally:
        clip.model.requires_grad_(False)
        clip.model.zero_grad(set_to_none=True)
    return maps, seconds


def _fast(clip, pixels, targets, settings, seed, batch_size):
    gens = _generators(len(pixels), seed)
    maps = []
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        part = slice(i, i + batch_size)
        maps.append(m2ib_saliency(clip.model.visual, pixels[part], targets[part], gens[part], settings))
    return torch.cat(maps), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2, help="images run through the reference (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="M2IB steps (default 10)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per step (default 10)")
    parser.add_argument("--layer", type=int, default=None, help="bottleneck block (default 9; tiny: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--batch-sizes", default="1,8", help="fast-path batch sizes (default 1,8)")
    parser.add_argument("--size", choices=("base", "tiny"), default="base", help="model size (default base)")
    parser.add_argument("--model-dir", default=None, help="folder for the random model, reused across runs")
    parser.add_argument("--pad-text", action="store_true", help="text tower at 256 tokens in the reference")
    parser.add_argument("--skip-reference", action="store_true", help="time the fast path only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    clip = _model(args.size, args.model_dir, args.seed)
    layer = args.layer if args.layer is not None else (9 if args.size == "base" else 3)
    settings = M2IBSettings(layer=layer, steps=args.steps, samples=args.samples)
    n_max = max([args.images, *batch_sizes])
    prompts = list(itertools.islice(itertools.cycle(PROMPTS), n_max))
    pixels = _images(clip, n_max, args.seed)
    targets = torch.stack([clip.encode_prompts([p]) for p in prompts])
    print(
        f"model {args.size} ({sum(p.numel() for p in clip.model.parameters()) / 1e6:.0f} M parameters), "
        f"threads {torch.get_num_threads()}, layer {settings.layer}, steps {settings.steps}, "
        f"samples {settings.samples}, reference images {args.images}, "
        f"text tokens {'padded to ' + str(clip.context_length) if args.pad_text else 'unpadded'}"
    )

    # Warm-up (first-call allocations, kernel selection), not timed.
    m2ib_saliency(
        clip.model.visual,
        pixels[:1],
        targets[:1],
        _generators(1, args.seed + 1),
        M2IBSettings(layer=layer, steps=2, samples=2),
    )

    ref_maps, ref_per_image = None, None
    if not args.skip_reference:
        n = args.images
        ref_maps, seconds = _reference(clip, pixels[:n], targets[:n], prompts[:n], settings, args.seed, args.pad_text)
        ref_per_image = seconds / n
        print(f"reference            {ref_per_image:8.2f} s/image")
    for batch_size in batch_sizes:
        n = max(args.images, batch_size)
        n -= n % batch_size  # whole batches only
        maps, seconds = _fast(clip, pixels[:n], targets[:n], settings, args.seed, batch_size)
        line = f"fast, batch {batch_size:<3d}      {seconds / n:8.2f} s/image"
        if ref_maps is not None:
            k = min(len(ref_maps), len(maps))
            diff = (maps[:k] - ref_maps[:k]).abs().max().item()
            line += f"   reference / fast {ref_per_image / (seconds / n):6.1f}x   max |map diff| {diff:.2e}"
        print(line)


if __name__ == "__main__":
    main()
