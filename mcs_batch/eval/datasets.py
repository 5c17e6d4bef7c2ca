"""Ground-truth datasets: the paper's four tasks in their public layout, and generic truth folders.

The paper's layout (the MedCLIP-SAMv2 data preparation, one folder per task under DIR):

    DIR/breast_tumors/test_images/*.png   DIR/breast_tumors/test_masks/*.png    (BUSI + UDIAT)
    DIR/brain_tumors/...                                                         (Figshare brain tumour)
    DIR/lung_xray/...                                                            (COVID-QU-Ex)
    DIR/lung_ct/...                                                              (Kaggle chest CT segmentation)

(train/val folders may sit beside them; evaluation uses test_* only.) Folder names are matched without
regard to case, and each task accepts a few spellings (PAPER_DATASETS[...].folders).

Pairing a mask with its image (the naming rule), by path relative to test_masks/ and test_images/:
1. the same relative path up to the extension (x.png <-> x.png, x.jpg <-> x.png);
2. else the mask's name minus a mask suffix: `_mask`, `-mask`, ` mask`, `_seg`, `_segmentation`,
   `_label`, `_gt` (any case), optionally followed by a number: BUSI ships `benign (4)_mask.png` and a
   second lesion as `benign (4)_mask_1.png`: all masks of one image are merged (their union).
An image without a mask, or a mask without an image, is reported (never silently paired or scored).

Generic truth (`evaluate --truth FOLDER`): every PNG/JPEG mask, NIfTI label map and DICOM SEG under
FOLDER, recognised by content. A folder with test_masks/ (and test_images/) is read in the paper layout.
In a folder that mixes images and masks (BUSI's own release), the files with a mask suffix are the
masks and a file of the same name without one is their image (ignored).
Keys: the path relative to FOLDER without extension (and mask suffix); a SEG also names the series and
instances it segments, which match predictions by SeriesInstanceUID / SOPInstanceUID.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pydicom

from mcs_batch.errors import ConfigError
from mcs_batch.eval.truth import SEG_SOP_CLASS, seg_references
from mcs_batch.io.discover import GZIP_MAGIC, ObjectRef, list_objects
from mcs_batch.io.images import sniff_image
from mcs_batch.io.nifti import sniff_nifti
from mcs_batch.io.storage import StorageOptions, filesystem_for

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
EXTENSIONS = (".nii.gz", ".nii", ".dcm", ".dicom", *IMAGE_EXTENSIONS)
MASK_SUFFIX = re.compile(r"^(?P<base>.+?)[ _-](?:mask|seg|segmentation|label|gt)(?:[ _-]?\d+)?$", re.IGNORECASE)
HEAD_BYTES = 2048


@dataclass(frozen=True)
class TruthItem:
    """One case's ground truth: one or more objects (unioned), and what it should match.

    key:      path relative to the truth root (or of the paired image), without extension
    kind:     "image" (PNG/JPEG mask), "nifti" (label map) or "seg" (DICOM Segmentation)
    """

    key: str
    uris: tuple[str, ...]
    kind: str
    series_uids: tuple[str, ...] = ()  # SEG: referenced series
    sop_uids: tuple[str, ...] = ()  # SEG: referenced instances
    case_id: str | None = None  # set by a mapping file


@dataclass
class TruthListing:
    items: list[TruthItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # images without masks, masks without images, ...
    ignored: list[str] = field(default_factory=list)  # objects that are not masks (source images, notes)


def strip_extension(rel: str) -> str:
    lower = rel.lower()
    for ext in EXTENSIONS:
        if lower.endswith(ext):
            return rel[: -len(ext)]
    return rel


def mask_base(rel: str) -> str:
    """'a/benign (4)_mask_1.png' -> 'a/benign (4)'; names without a mask suffix keep their stem."""
    stem = strip_extension(rel)
    folder, name = posixpath.split(stem)
    match = MASK_SUFFIX.match(name)
    return posixpath.join(folder, match.group("base")) if match else stem


def pair_images_masks(images: Sequence[ObjectRef], masks: Sequence[ObjectRef]) -> TruthListing:
    """Pair masks with images by the naming rule (module doc). Keys are the images' (relative to
    their folder, without extension), which is what a job over the images folder calls them."""
    by_stem = {strip_extension(r.rel): r for r in images}
    grouped: dict[str, list[str]] = {}
    listing = TruthListing()
    for m in sorted(masks, key=lambda r: r.rel):
        stem = strip_extension(m.rel)
        key = stem if stem in by_stem else mask_base(m.rel)
        if key not in by_stem:
            listing.problems.append(f"mask without an image: {m.uri}")
            continue
        grouped.setdefault(key, []).append(m.uri)
    for stem, image in sorted(by_stem.items()):
        if stem in grouped:
            listing.items.append(TruthItem(key=stem, uris=tuple(grouped[stem]), kind="image"))
        else:
            listing.problems.append(f"image without a mask: {image.uri}")
    return listing


def _subfolder(refs: Sequence[ObjectRef], name: str) -> list[ObjectRef]:
    """Objects under a first-level folder `name` (any case), with rel made relative to it."""
    out = []
    for r in refs:
        head, _, rest = r.rel.partition("/")
        if rest and head.lower() == name:
            out.append(ObjectRef(uri=r.uri, rel=rest, size=r.size))
    return out


def _is_image(ref: ObjectRef) -> bool:
    return ref.rel.lower().endswith(IMAGE_EXTENSIONS)


def paper_layout(refs: Sequence[ObjectRef]) -> TruthListing | None:
    """The pairs of a folder in the paper's layout (test_images/ + test_masks/), else None."""
    masks = [r for r in _subfolder(refs, "test_masks") if _is_image(r)]
    if not masks:
        return None
    return pair_images_masks([r for r in _subfolder(refs, "test_images") if _is_image(r)], masks)


def _sniff(ref: ObjectRef, fs) -> TruthItem | None:
    """What a truth object is, by content; None for objects that are not masks."""
    path = fs._strip_protocol(ref.uri)
    with fs.open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        if sniff_image(head):
            return TruthItem(key=mask_base(ref.rel), uris=(ref.uri,), kind="image")
        if head.startswith(GZIP_MAGIC) or sniff_nifti(head):
            return TruthItem(key=strip_extension(ref.rel), uris=(ref.uri,), kind="nifti")
        if head[128:132] != b"DICM":
            return None
        f.seek(0)
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            return None
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        return None
    series, sops = seg_references(ds)
    return TruthItem(
        key=strip_extension(ref.rel), uris=(ref.uri,), kind="seg", series_uids=tuple(series), sop_uids=tuple(sops)
    )


def list_truth(truth: str, *, storage: StorageOptions | None = None) -> TruthListing:
    """Every ground-truth item under `truth` (a folder, a prefix or one file); see the module doc."""
    refs = list_objects([truth], storage=storage, named=False)
    paired = paper_layout(refs)
    if paired is not None:
        paired.ignored = [r.uri for r in refs if not r.rel.lower().startswith(("test_masks/", "test_images/"))]
        return paired
    fs, _ = filesystem_for(truth, storage)
    listing = TruthListing()
    found: list[tuple[ObjectRef, TruthItem]] = []
    for ref in refs:
        try:
            item = _sniff(ref, fs)
        except OSError as e:
            listing.problems.append(f"cannot read {ref.uri} ({e})")
            continue
        if item is None:
            listing.ignored.append(ref.uri)
        else:
            found.append((ref, item))
    # A folder mixing images and masks (BUSI's own release: `benign (1).png` beside `benign (1)_mask.png`):
    # where a key has files with a mask suffix, those are the masks and the others are the images.
    suffixed = {
        item.key for ref, item in found if item.kind == "image" and mask_base(ref.rel) != strip_extension(ref.rel)
    }
    merged: dict[tuple[str, str], TruthItem] = {}
    for ref, item in found:
        if item.kind == "image" and item.key in suffixed and mask_base(ref.rel) == strip_extension(ref.rel):
            listing.ignored.append(ref.uri)  # the image of a mask beside it
            continue
        if item.kind == "image" and (item.key, "image") in merged:  # BUSI's extra masks: one case, their union
            first = merged[(item.key, "image")]
            merged[(item.key, "image")] = TruthItem(key=first.key, uris=(*first.uris, *item.uris), kind="image")
            continue
        if (item.key, item.kind) in merged:
            listing.problems.append(f"two truth objects for {item.key!r}: {merged[(item.key, item.kind)].uris[0]}, "
                                    f"{item.uris[0]}; the second is ignored")  # fmt: skip
            continue
        merged[(item.key, item.kind)] = item
    listing.items = sorted(merged.values(), key=lambda i: (i.key, i.kind))
    return listing


MAPPING_COLUMNS = ("case_id", "source_key", "series_uid")


def read_mapping(text: str, listing: TruthListing, *, name: str) -> tuple[list[TruthItem], str]:
    """A mapping CSV: a `truth` column (path relative to the truth root, or its URI) and one of
    case_id / source_key / series_uid. Returns the truth items re-keyed by that column, and its name."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    by = [c for c in MAPPING_COLUMNS if c in columns]
    if "truth" not in columns or len(by) != 1:
        raise ConfigError(f"{name}: needs a 'truth' column and exactly one of {', '.join(MAPPING_COLUMNS)}; "
                          f"has {', '.join(columns) or 'no header'}")  # fmt: skip
    column = by[0]
    index: dict[str, TruthItem] = {}
    for item in listing.items:
        index[item.key] = item
        for uri in item.uris:
            index[uri] = item
            index[strip_extension(uri)] = item
    items = []
    for n, row in enumerate(reader, start=2):
        ref, value = (row.get("truth") or "").strip(), (row.get(column) or "").strip()
        if not ref or not value:
            raise ConfigError(f"{name}: line {n}: empty truth or {column}")
        item = index.get(ref) or index.get(strip_extension(ref)) or index.get(mask_base(ref))
        if item is None:
            raise ConfigError(f"{name}: line {n}: no ground truth {ref!r} under the truth folder")
        if column == "case_id":
            items.append(TruthItem(key=item.key, uris=item.uris, kind=item.kind, case_id=value))
        elif column == "series_uid":
            items.append(TruthItem(key=item.key, uris=item.uris, kind=item.kind, series_uids=(value,)))
        else:
            items.append(TruthItem(key=strip_extension(value), uris=item.uris, kind=item.kind))
    return items, column


# -- the paper's four tasks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperDataset:
    """One of the paper's zero-shot tasks: where its data goes, its job file, the published result."""

    name: str  # our name, used in output paths and tables
    title: str
    folders: tuple[str, ...]  # accepted folder names under DIR (any case); the first is the one we ask for
    config: str  # job file in jobs/configs/
    source: str  # the public release
    paper_dsc: float  # zero-shot DSC and NSD (%), METHOD.md
    paper_nsd: float


PAPER_DATASETS: tuple[PaperDataset, ...] = (
    PaperDataset("breast_us", "Breast US", ("breast_tumors", "breast_tumours", "breast_us", "busi"),
                 "breast_us_tumour.yaml", "BUSI + UDIAT breast ultrasound", 77.76, 81.11),
    PaperDataset("brain_mri", "Brain MRI", ("brain_tumors", "brain_tumours", "brain_mri"),
                 "brain_mri_tumour.yaml", "Figshare brain tumour MRI", 76.52, 82.23),
    PaperDataset("lung_xray", "Lung X-ray", ("lung_xray", "lung_x-ray", "covid_qu_ex", "covidqu"),
                 "lung_xray.yaml", "COVID-QU-Ex chest X-ray lung masks", 75.79, 80.88),
    PaperDataset("lung_ct", "Lung CT", ("lung_ct", "lungct", "chest_ct"),
                 "lung_ct.yaml", "Kaggle chest CT segmentation (2D slices)", 80.38, 82.03),
)  # fmt: skip
PAPER_MEAN = (77.61, 81.56)  # zero-shot mean DSC / NSD over the four tasks (%)
# Ablation, mean DSC (%) over the four tasks; our `ablation` rows and the paper's. The paper's rows from
# post-processing on use the DHN-NCE fine-tuned BiomedCLIP (saliency alone: 46.23 without it, 49.10 with).
PAPER_ABLATION = {"saliency": 46.23, "postprocess": 51.62, "components": 57.89, "full": 77.61}
PAPER_ABLATION_NOTES = {
    "saliency": "saliency alone (49.10 with DHN-NCE)",
    "postprocess": "+ DHN-NCE + post-processing",
    "components": "+ connected components",
    "full": "+ SAM (the method)",
}


def paper_dataset(name: str) -> PaperDataset:
    for d in PAPER_DATASETS:
        if d.name == name:
            return d
    raise ConfigError(f"unknown dataset {name!r} (choose from {', '.join(d.name for d in PAPER_DATASETS)})")


def find_dataset_folder(data_dir: str, dataset: PaperDataset, *, storage: StorageOptions | None = None) -> str | None:
    """DIR/<one of dataset.folders> (any case) when it has test_images/ and test_masks/, else None."""
    fs, root = filesystem_for(data_dir, storage)
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    names = {posixpath.basename(e.rstrip("/")).lower(): e for e in entries}
    for folder in dataset.folders:
        path = names.get(folder.lower())
        if path is None:
            continue
        inner = {posixpath.basename(e.rstrip("/")).lower() for e in fs.ls(path, detail=False)}
        if {"test_images", "test_masks"} <= inner:
            return fs.unstrip_protocol(path)
    return None


def subfolder(folder: str, name: str, *, storage: StorageOptions | None = None) -> str:
    """The child of `folder` called `name` in any case (test_images may be spelled Test_Images)."""
    fs, root = filesystem_for(folder, storage)
    for entry in fs.ls(root, detail=False):
        if posixpath.basename(entry.rstrip("/")).lower() == name.lower():
            return fs.unstrip_protocol(entry)
    raise ConfigError(f"{folder}: no {name}/ folder")
