"""Pseudo-labels of volumes -> nnU-Net v2's raw layout for 3d_fullres: whole volumes in physical units.

    WORK/nnUNet_raw/Dataset<id>_<name>/imagesTr/<case_id>_0000.nii.gz   float32 [I, J, K], the source's
                                    values as io/ loads them (HU for CT after the modality LUT, scaled
                                    NIfTI values), in the display orientation (io/display.py: L, P, S)
                                    with the affine that goes with it (spacing and position kept)
    WORK/nnUNet_raw/Dataset<id>_<name>/labelsTr/<case_id>.nii.gz        uint8, same grid and affine:
                                    0 background, 1 the pseudo-label, 2 "ignore" on slices whose
                                    mask failed the slice filters (not trained on, not background)
    WORK/nnUNet_raw/Dataset<id>_<name>/dataset.json                   channel "CT" (nnU-Net's CT
                                    normalisation) or another modality (its z-score); NibabelIO reads
    WORK/mapping/part-<n>.parquet   one row per volume: identifier -> case_id, slice_index -1 (whole)

The display orientation gives nnU-Net every case with the same axis order whatever its storage (a
DICOM series and a NIfTI stored R, A, S), as nnU-Net's NibabelIOWithReorient would; refine predicts
in the same orientation and writes back in the stored grid (io/display.to_stored).
Slices of a selected case without a mask are background: nnU-Net samples them as it samples any
background. Each Ray task exports a few cases and returns only mapping rows, drop counts and the
modalities it saw; no volume passes the driver.
"""

from __future__ import annotations

import gzip
import posixpath
from collections import Counter
from collections.abc import Iterable

import nibabel as nib
import numpy as np

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError
from mcs_batch.io.display import VOLUME_KINDS, to_display, volume_in_display
from mcs_batch.io.load import load_case
from mcs_batch.io.storage import StorageOptions, filesystem_for
from mcs_batch.io.volume import plane
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.reader import job_config_of_run, read_mask, record_of
from mcs_batch.records import slice_axis_for
from mcs_batch.train.weak.config import AUTO, Configuration, WeakConfig
from mcs_batch.train.weak.select import agreement, slice_drop_reason

IGNORE = 2  # nnU-Net's ignore label: the highest label value, named "ignore" in dataset.json
WHOLE_VOLUME = -1  # the mapping's slice_index of a 3d_fullres training image
CT_CHANNEL, ZSCORE_CHANNEL = "CT", "zscore"  # nnU-Net: "CT" -> CTNormalization, any other -> z-score


def is_volume(row: dict) -> bool:
    """A catalog case row of a volume (NIfTI, DICOM series or multi-frame, more than one slice)."""
    shape = row.get("shape") or [1, 1, 1]
    return row.get("kind") in VOLUME_KINDS and len(shape) >= 3 and int(shape[2]) > 1


def resolve_configuration(requested: Configuration | str, cases: Iterable[dict]) -> Configuration:
    """auto: 3d_fullres when every selected case is a volume (and there is one), else 2d."""
    requested = Configuration(requested)
    if requested != Configuration.AUTO:
        return requested
    rows = list(cases)
    return Configuration.THREE_D if rows and all(is_volume(r) for r in rows) else Configuration.TWO_D


def channel_name(requested: str, modalities: Iterable[str]) -> str:
    """The dataset's channel name: `export.modality`, or (auto) the one known modality of its cases
    ("CT" upper-cased: nnU-Net's CT normalisation), "zscore" for none or several."""
    if requested != AUTO:
        return requested
    known = {m.upper() for m in modalities if m}
    return known.pop() if len(known) == 1 else ZSCORE_CHANNEL


def nifti_gz(array: np.ndarray, affine: np.ndarray) -> bytes:
    """[I, J, K] array with its affine (sform and qform) -> .nii.gz bytes (dtype kept)."""
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, float))
    image.set_sform(np.asarray(affine, float), code=1)
    image.set_qform(np.asarray(affine, float), code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1)


def label_volume(mask: np.ndarray, slices: list[dict], axis: int, cfg: WeakConfig) -> tuple[np.ndarray, Counter]:
    """The training label of one volume (display grid): the mask as 0/1, and every slice with a mask
    that fails the slice filters (SAM score, agreement, too few pixels) set to IGNORE whole. Slices
    without a mask stay background. Returns (uint8 [I, J, K], slice drop reasons)."""
    label = (np.asarray(mask) > 0).astype(np.uint8)
    dropped: Counter = Counter()
    for s in slices:
        k = int(s["slice_index"])
        if not 0 <= k < label.shape[axis]:
            continue
        mask_hw = plane(label, k, axis) > 0
        pixels = int(mask_hw.sum())
        if not pixels:
            continue
        reason = slice_drop_reason(pixels, s.get("sam_score"), agreement(mask_hw, s.get("boxes_xyxy")), cfg.select)
        if reason:
            dropped[reason] += 1
            where: list = [slice(None)] * 3
            where[axis] = k
            label[tuple(where)] = IGNORE
    return label, dropped


def export_volume_cases(cases: list[dict], slices: dict[str, list[dict]], *, cfg: WeakConfig, raw: str,
                        storage: StorageOptions | None) -> dict:  # fmt: skip
    """Ray task body: write the image and label volumes of a few selected cases under `raw`.
    Returns {"rows": mapping rows, "dropped": {...}, "modalities": [...], "ignored": slices set to ignore}."""
    fs, root = filesystem_for(raw, storage)
    rows: list[dict] = []
    dropped: Counter = Counter()
    modalities: list[str] = []
    ignored = 0
    configs: dict[str, JobConfig] = {}
    for case in cases:
        run_id = case.get("run_id") or ""
        if run_id not in configs:
            configs[run_id] = job_config_of_run(Catalog(cfg.source, storage=storage), run_id)
        record = record_of(case)
        if not is_volume(case):
            dropped["not_a_volume"] += 1
            continue
        axis = slice_axis_for(record, configs[run_id].slice_axis)
        try:
            volume = volume_in_display(load_case(record, fs=filesystem_for(record.source_uris[0], storage)[0]), record)
            mask = to_display(read_mask(case["mask_uri"], storage), record)
            if volume.is_rgb or mask.shape != volume.shape:
                dropped["mask_grid_differs" if not volume.is_rgb else "rgb_volume"] += 1
                continue
            label, slice_drops = label_volume(mask, slices.get(record.case_id, []), axis, cfg)
        except CaseError as e:
            dropped[f"unreadable:{e.code}"] += 1
            continue
        except (OSError, ValueError) as e:  # a mask or image that cannot be read: the case is left out
            dropped[f"unreadable:{type(e).__name__}"] += 1
            continue
        dropped.update(slice_drops)
        if not (label == 1).any():
            dropped["no_labelled_slice"] += 1
            continue
        ignored += sum(slice_drops.values())
        fs.makedirs(posixpath.join(root, "imagesTr"), exist_ok=True)
        fs.makedirs(posixpath.join(root, "labelsTr"), exist_ok=True)
        name = record.case_id
        fs.pipe_file(posixpath.join(root, "imagesTr", f"{name}_0000.nii.gz"),
                     nifti_gz(volume.array.astype(np.float32), volume.affine))  # fmt: skip
        fs.pipe_file(posixpath.join(root, "labelsTr", f"{name}.nii.gz"), nifti_gz(label, volume.affine))
        modalities.append(record.modality or "")
        rows.append({"identifier": name, "case_id": record.case_id, "slice_index": WHOLE_VOLUME,
                     "dataset": case.get("dataset", ""), "sam_score": case.get("sam_score_mean"),
                     "agreement": None, "mask_pixels": int((label == 1).sum())})  # fmt: skip
    return {"rows": rows, "dropped": dict(dropped), "modalities": modalities, "ignored": ignored}


def dataset_json_3d(cfg: WeakConfig, n_training: int, channel: str, with_ignore: bool) -> dict:
    labels = {"background": 0, cfg.target: 1}
    if with_ignore:
        labels["ignore"] = IGNORE
    return {
        "channel_names": {"0": channel},
        "labels": labels,
        "numTraining": n_training,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIO",  # what is written is read: no reorientation, zooms
        "name": cfg.dataset_name,
        "description": f"mcs-batch pseudo-labels of target {cfg.target!r} from {cfg.source} (3d_fullres)",
    }
