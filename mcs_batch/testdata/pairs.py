"""Synthetic image-caption pairs whose captions describe the image: for tests and smoke runs.

    listing = write_shape_pairs(folder, n=240, seed=0)    # folder/images/*.png + folder/pairs.parquet

Each image is a dark grey square canvas with one coloured shape; its caption names the colour, the
shape and where it is, e.g. "a red round mass on the left". Sizes, exact positions and noise vary per
image (seeded), so validation images are new images of combinations seen in training. Words the tiny
BiomedCLIP vocabulary lacks ("red", "square") are spelled out by its single-character tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 200),
}
SHAPES = ("round", "square")
POSITIONS = ("left", "right")
ALL_COMBOS = tuple(itertools.product(COLOURS, SHAPES, POSITIONS))
# One (colour, shape, position) per colour: what a tiny random model learns within a minute (its towers
# pick up colour quickly; shape and position need many more steps), for fast learning tests.
ONE_PER_COLOUR = (
    ("red", "round", "left"),
    ("green", "square", "right"),
    ("blue", "square", "left"),
    ("yellow", "round", "right"),
    ("white", "square", "left"),
    ("purple", "round", "right"),
)


def shape_image(colour: str, shape: str, position: str, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB [size, size, 3]: one shape of `colour` in the `position` half of a noisy dark canvas."""
    canvas = rng.normal(40, 8, (size, size, 1)).clip(0, 255) * np.ones((1, 1, 3))
    radius = rng.uniform(0.14, 0.22) * size
    cx = rng.uniform(0.22, 0.3) * size if position == "left" else rng.uniform(0.7, 0.78) * size
    cy = rng.uniform(0.3, 0.7) * size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "round":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:
        inside = (np.abs(yy - cy) <= radius * 0.9) & (np.abs(xx - cx) <= radius * 0.9)
    canvas[inside] = np.asarray(COLOURS[colour], float) + rng.normal(0, 6, (int(inside.sum()), 3))
    return canvas.clip(0, 255).astype(np.uint8)


def caption_for(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} mass on the {position}"


def write_shape_pairs(
    folder: Path,
    *,
    n: int = 240,
    seed: int = 0,
    size: int = 64,
    fmt: str = "parquet",
    combos: Sequence[tuple[str, str, str]] = ALL_COMBOS,
) -> Path:
    """Write n PNGs under folder/images and a listing (columns image, caption; image paths relative
    to the listing) as folder/pairs.<parquet|csv|jsonl>; returns the listing's path. Image i shows
    combos[i % len(combos)] (colour, shape, position)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        colour, shape, position = combos[i % len(combos)]
        rel = f"images/{i:05d}.png"
        Image.fromarray(shape_image(colour, shape, position, size=size, rng=rng)).save(folder / rel)
        images.append(rel)
        captions.append(caption_for(colour, shape, position))
    table = pa.table({"image": images, "caption": captions})
    if fmt == "parquet":
        path = folder / "pairs.parquet"
        pq.write_table(table, path)
    elif fmt == "csv":
        path = folder / "pairs.csv"
        pacsv.write_csv(table, path)
    elif fmt == "jsonl":
        import json

        path = folder / "pairs.jsonl"
        path.write_text(
            "".join(json.dumps({"image": a, "caption": b}) + "\n" for a, b in zip(images, captions, strict=True))
        )
    else:
        raise ValueError(f"unknown listing format {fmt!r}; expected parquet, csv or jsonl")
    return path
