"""Image-caption pairs for fine-tuning, as Ray Datasets.

A listing is a Parquet, CSV or JSONL file (or a folder of them) with one row per pair: an image URI
(any fsspec URI, or a path relative to the listing's folder; DICOM, PNG or JPEG) and its caption.

    pairs = read_pairs(cfg.data, storage=storage)        # image_uri, caption, split; materialised
    counts = split_counts(pairs)                          # {"train": n, "val": m, "dropped_short": k}
    train = decoded(pairs, "train", cfg.data, image_size=224, storage=storage)   # pixels, caption

Captions are trimmed and their whitespace collapsed; rows with no image, or a caption shorter than
`min_caption_chars` / `min_caption_words`, are dropped (and counted). The split is a pure function of
the image URI: sha256(salt + "\\n" + uri), first 8 bytes big-endian / 2^64 < val_fraction -> "val".
So every caption of one image lands in the same split, and the split never changes between runs or
machines (never Python's `hash()`).

Images get exactly the segmentation job's preprocessing: DICOM frames and PNG/JPEG through
`to_model_rgb` (modality window / percentiles; 8-bit greyscale as stored), then `resize_for_clip` into
the model's square (resize or pad, never crop). Rows leave decoding as uint8 [S, S, 3] ("pixels"): the worker
normalises them with the model's own mean / std (`normalise_pixels`), which is what `to_clip_input`
does. An image that cannot be read or decoded is dropped with a warning naming it.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from collections.abc import Sequence

import numpy as np

from mcs_batch.errors import CaseError, ConfigError, ErrorCode
from mcs_batch.io.dicom import decode_frames, read_dataset, shown_as_stored
from mcs_batch.io.images import load_image, sniff_image
from mcs_batch.io.storage import StorageOptions, fetch_bytes, filesystem_for, protocol_of
from mcs_batch.io.window import WindowSettings, to_model_rgb
from mcs_batch.models.biomedclip import resize_for_clip
from mcs_batch.train.config import PairsConfig

logger = logging.getLogger(__name__)

TRAIN, VAL = "train", "val"
DROPPED_NO_IMAGE, DROPPED_SHORT = "dropped_no_image", "dropped_short_caption"
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


# -- pure parts ------------------------------------------------------------------------------------


def split_of(image_uri: str, *, val_fraction: float, salt: str) -> str:
    """'val' or 'train' for an image, a pure function of (salt, uri) (see the module docstring)."""
    digest = hashlib.sha256(f"{salt}\n{image_uri}".encode()).digest()
    return VAL if int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction else TRAIN


def clean_caption(value) -> str:
    """Trimmed caption with runs of whitespace collapsed to one space ('' for missing values)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return re.sub(r"\s+", " ", str(value)).strip()


def caption_ok(caption: str, cfg: PairsConfig) -> bool:
    return len(caption) >= cfg.min_caption_chars and len(caption.split()) >= cfg.min_caption_words


def resolve_uri(value: str, listing_dir: str) -> str:
    """An image reference as written in a listing -> a full URI (relative paths: to the listing)."""
    if "://" in value or value.startswith("/"):
        return value
    return posixpath.join(listing_dir, value)


def listing_format(uri: str, configured: str) -> str:
    if configured != "auto":
        return configured
    ext = posixpath.splitext(uri.rstrip("/"))[1].lower()
    if ext not in _EXTENSIONS:
        raise ConfigError(
            f"{uri}: cannot tell the listing format from its name; set data.format to parquet, csv or jsonl"
        )
    return _EXTENSIONS[ext]


def prepare_batch(batch, *, cfg: PairsConfig, listing_dir: str):
    """Listing rows (pandas) -> image_uri, caption, split (train / val / dropped_*) for every row."""
    import pandas as pd

    images = batch[cfg.image_column]
    captions = [clean_caption(c) for c in batch[cfg.caption_column]]
    uris, splits = [], []
    for image, caption in zip(images, captions, strict=True):
        image = "" if image is None or (isinstance(image, float) and np.isnan(image)) else str(image).strip()
        uri = resolve_uri(image, listing_dir) if image else ""
        uris.append(uri)
        if not uri:
            splits.append(DROPPED_NO_IMAGE)
        elif not caption_ok(caption, cfg):
            splits.append(DROPPED_SHORT)
        else:
            splits.append(split_of(uri, val_fraction=cfg.val_fraction, salt=cfg.split_salt))
    return pd.DataFrame({"image_uri": uris, "caption": captions, "split": splits})


def load_pair_image(data: bytes, *, uri: str, window: WindowSettings) -> np.ndarray:
    """Image bytes (PNG, JPEG or DICOM) -> uint8 RGB [H, W, 3], as the segmentation job sees it.

    A multi-frame DICOM gives its middle frame. Raises CaseError with a reason code.
    """
    if sniff_image(data[:16]):
        volume = load_image(data, uri=uri)
        return to_model_rgb(volume.slice_image(0), modality="", settings=window, as_stored=volume.meta["as_stored"])
    ds = read_dataset(data, uri=uri)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise CaseError(f"{uri}: neither PNG, JPEG nor DICOM", code=ErrorCode.NOT_DICOM)
        raise CaseError(f"{uri}: DICOM object without pixel data", code=ErrorCode.NO_PIXEL_DATA)
    frames = decode_frames(ds, uri=uri)
    modality = str(ds.get("Modality", ""))
    return to_model_rgb(frames[len(frames) // 2], modality=modality, settings=window, as_stored=shown_as_stored(ds))


def decode_batch(batch: dict, *, storage: StorageOptions | None, image_size: int, resize: str, window: WindowSettings):
    """Pairs (numpy batch) -> pixels uint8 [n, S, S, 3] and caption; unreadable images dropped."""
    pixels, captions, uris = [], [], []
    filesystems: dict[str, object] = {}
    for uri, caption in zip(batch["image_uri"], batch["caption"], strict=True):
        uri = str(uri)
        protocol = protocol_of(uri)
        try:
            if protocol not in filesystems:
                filesystems[protocol] = filesystem_for(uri, storage)[0]
            image = load_pair_image(fetch_bytes(filesystems[protocol], uri), uri=uri, window=window)
            placed, _ = resize_for_clip(image, resize, size=image_size)
        except (CaseError, ConfigError) as e:
            logger.warning("dropping pair: %s", e)
            continue
        pixels.append(placed.astype(np.uint8))
        captions.append(str(caption))
        uris.append(uri)
    stacked = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
    return {"pixels": stacked, "caption": np.asarray(captions, dtype=object), "image_uri": np.asarray(uris, object)}


def normalise_pixels(pixels, *, mean: Sequence[float], std: Sequence[float]):
    """uint8 [B, S, S, 3] (tensor) -> float32 [B, 3, S, S]: exactly `to_clip_input`'s normalisation."""
    import torch

    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# -- Ray Data --------------------------------------------------------------------------------------


def _listing_parts(cfg: PairsConfig, storage: StorageOptions | None):
    """(uri, format, folder of the listing, is_folder) for every configured listing."""
    if not cfg.listing:
        raise ConfigError("data.listing: no listing of image-caption pairs given")
    parts = []
    for uri in cfg.listing:
        fs, path = filesystem_for(uri, storage)
        try:
            is_dir = fs.isdir(path)
            exists = is_dir or fs.isfile(path)
        except Exception as e:
            raise ConfigError(f"{uri}: cannot reach the listing ({type(e).__name__}: {e})") from e
        if not exists:
            raise ConfigError(f"{uri}: no such listing file or folder")
        if is_dir and cfg.format == "auto":
            raise ConfigError(f"{uri}: a folder of listings needs data.format (parquet, csv or jsonl)")
        fmt = listing_format(uri, cfg.format)
        parts.append((uri, fmt, uri.rstrip("/") if is_dir else posixpath.dirname(uri.rstrip("/")), is_dir))
    return parts


def read_listing(uri: str, fmt: str, *, storage: StorageOptions | None):
    """One listing as a Ray Dataset, read through the same (fsspec) filesystem as everything else."""
    import pyarrow.fs as pafs
    import ray.data

    fs, path = filesystem_for(uri, storage)
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    if fmt == "parquet":
        return ray.data.read_parquet(path, filesystem=arrow_fs)
    if fmt == "csv":
        return ray.data.read_csv(path, filesystem=arrow_fs)
    # pyarrow's JSON reader reads newline-delimited JSON (Ray's `lines=True` reader takes no filesystem)
    return ray.data.read_json(path, filesystem=arrow_fs, file_extensions=None)


def read_pairs(cfg: PairsConfig, *, storage: StorageOptions | None = None):
    """Every listing row as (image_uri, caption, split), materialised (the listing is small)."""
    datasets = []
    for uri, fmt, listing_dir, _ in _listing_parts(cfg, storage):
        ds = read_listing(uri, fmt, storage=storage)
        names = set(ds.schema().names)
        missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in names]
        if missing:
            raise ConfigError(
                f"{uri}: no column {missing[0]!r} (columns: {', '.join(sorted(names))}); "
                "set data.image_column / data.caption_column"
            )
        datasets.append(
            ds.select_columns([cfg.image_column, cfg.caption_column]).map_batches(
                prepare_batch, batch_format="pandas", fn_kwargs={"cfg": cfg, "listing_dir": listing_dir}
            )
        )
    pairs = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    return pairs.materialize()


def split_counts(pairs) -> dict[str, int]:
    """Rows per split value (train, val, dropped_*) of `read_pairs`' dataset."""
    counts = {TRAIN: 0, VAL: 0, DROPPED_NO_IMAGE: 0, DROPPED_SHORT: 0}
    for batch in pairs.select_columns(["split"]).iter_batches(batch_format="pyarrow", batch_size=65536):
        for item in batch.column("split").value_counts().to_pylist():
            counts[item["values"]] += int(item["counts"])
    return counts


def decoded(pairs, split: str, cfg: PairsConfig, *, image_size: int, storage: StorageOptions | None, num_cpus: float):
    """The pairs of one split with decoded images: pixels uint8 [S, S, 3], caption, image_uri."""
    chosen = pairs.filter(lambda row: row["split"] == split)
    return chosen.map_batches(
        decode_batch,
        batch_format="numpy",
        batch_size=16,
        num_cpus=num_cpus,
        fn_kwargs={"storage": storage, "image_size": image_size, "resize": cfg.resize, "window": cfg.window},
    )


def listing_digest(cfg: PairsConfig, *, storage: StorageOptions | None = None) -> dict:
    """{"files": {uri: sha256}, "digest": sha256 of that listing}: which data the model saw."""
    files: dict[str, str] = {}
    for uri, _, _, is_dir in _listing_parts(cfg, storage):
        fs, path = filesystem_for(uri, storage)
        names = sorted(fs.find(path)) if is_dir else [path]
        for name in names:
            digest = hashlib.sha256()
            with fs.open(name, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            files[fs.unstrip_protocol(name) if is_dir or "://" in uri else name] = digest.hexdigest()
    text = "".join(f"{name}\t{sha}\n" for name, sha in sorted(files.items()))
    return {"files": files, "digest": hashlib.sha256(text.encode()).hexdigest()}
