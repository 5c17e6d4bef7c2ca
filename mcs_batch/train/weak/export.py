"""Pseudo-labels -> nnU-Net v2's raw dataset layout, streamed, on local disk or S3. The 2d configuration
(here; volumes in 3d_fullres: export3d.py, the same driver):

    WORK/nnUNet_raw/Dataset<id>_<name>/imagesTr/<case_id>_<slice>_0000.png   RGB uint8, the plane the
                                                                             job segmented (same window)
    WORK/nnUNet_raw/Dataset<id>_<name>/labelsTr/<case_id>_<slice>.png        uint8 0 / 1, same frame
    WORK/nnUNet_raw/Dataset<id>_<name>/dataset.json
    WORK/mapping/part-<n>.parquet     one row per training image: identifier -> (case_id, slice_index),
                                      dataset, SAM score, agreement, mask pixels

Each Ray task exports a few cases (reads their images and masks, writes their PNGs) and returns only
mapping rows and drop counts; the driver keeps a few tasks in flight. No image passes the driver.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mcs_batch.config import JobConfig
from mcs_batch.errors import CaseError
from mcs_batch.io.display import to_display
from mcs_batch.io.storage import StorageOptions, filesystem_for, join
from mcs_batch.io.volume import plane
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.reader import job_config_of_run, read_mask, record_of
from mcs_batch.records import slice_axis_for
from mcs_batch.stages.load import load_chunk
from mcs_batch.train.weak.config import Configuration, WeakConfig
from mcs_batch.train.weak.export3d import channel_name, dataset_json_3d, export_volume_cases
from mcs_batch.train.weak.select import agreement, pick_empty_slices, slice_drop_reason

MAPPING_SCHEMA = pa.schema(
    [
        pa.field("identifier", pa.string(), nullable=False),  # nnU-Net case identifier
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("sam_score", pa.float64()),
        pa.field("agreement", pa.float64()),
        pa.field("mask_pixels", pa.int64()),
    ]
)


def raw_folder(cfg: WeakConfig) -> str:
    return join(cfg.work, "nnUNet_raw", cfg.dataset_name)


def identifier(case_id: str, k: int) -> str:
    return f"{case_id}_{k:05d}"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def export_cases(cases: list[dict], slices: dict[str, list[dict]], *, cfg: WeakConfig,
                 storage: StorageOptions | None) -> dict:  # fmt: skip
    """Ray task body: write the images and labels of a few selected cases. Returns mapping rows and
    drop counts ({"rows": [...], "dropped": {...}})."""
    fs, root = filesystem_for(raw_folder(cfg), storage)
    rows: list[dict] = []
    dropped: Counter = Counter()
    configs: dict[str, JobConfig] = {}
    for case in cases:
        run_id = case.get("run_id") or ""
        if run_id not in configs:
            configs[run_id] = job_config_of_run(Catalog(cfg.source, storage=storage), run_id)
        job = configs[run_id]
        record = record_of(case)
        axis = slice_axis_for(record, job.slice_axis)
        try:
            mask = to_display(read_mask(case["mask_uri"], storage), record)  # the grid the job's slices came from
            source_fs = filesystem_for(record.source_uris[0], storage)[0]
            keep, empty = [], {}
            for s in sorted(slices.get(case["case_id"], []), key=lambda s: s["slice_index"]):
                k = int(s["slice_index"])
                mask_hw = plane(mask, k, axis) > 0
                agree = agreement(mask_hw, s.get("boxes_xyxy"))
                reason = slice_drop_reason(int(mask_hw.sum()), s.get("sam_score"), agree, cfg.select)
                if reason == "empty_slice":
                    empty[k] = (k, mask_hw, s.get("sam_score"), agree)
                elif reason:
                    dropped[reason] += 1
                else:
                    keep.append((k, mask_hw, s.get("sam_score"), agree))
            picked = pick_empty_slices(sorted(empty), len(keep), cfg.select, record.case_id) if keep else []
            if len(empty) > len(picked):
                dropped["empty_slice"] += len(empty) - len(picked)
            keep = sorted([*keep, *(empty[k] for k in picked)], key=lambda item: item[0])
            cache: dict = {}
            for k, mask_hw, score, agree in keep:
                (image,) = load_chunk(record, k, k + 1, job, fs=source_fs, cache=cache)
                name = identifier(record.case_id, k)
                fs.makedirs(posixpath.join(root, "imagesTr"), exist_ok=True)
                fs.makedirs(posixpath.join(root, "labelsTr"), exist_ok=True)
                fs.pipe_file(posixpath.join(root, "imagesTr", f"{name}_0000.png"), png(image))
                fs.pipe_file(posixpath.join(root, "labelsTr", f"{name}.png"), png(mask_hw.astype(np.uint8)))
                rows.append({"identifier": name, "case_id": record.case_id, "slice_index": k,
                             "dataset": case.get("dataset", ""), "sam_score": score, "agreement": agree,
                             "mask_pixels": int(mask_hw.sum())})  # fmt: skip
        except CaseError as e:
            dropped[f"unreadable:{e.code}"] += 1
        except (OSError, ValueError) as e:  # a mask or image that cannot be read: the case is left out
            dropped[f"unreadable:{type(e).__name__}"] += 1
    return {"rows": rows, "dropped": dict(dropped)}


def dataset_json_2d(cfg: WeakConfig, n_training: int) -> dict:
    return {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, cfg.target: 1},
        "numTraining": n_training,
        "file_ending": ".png",
        "name": cfg.dataset_name,
        "description": f"mcs-batch pseudo-labels of target {cfg.target!r} from {cfg.source}",
    }


def write_dataset_json(cfg: WeakConfig, document: dict, storage: StorageOptions | None) -> str:
    fs, root = filesystem_for(raw_folder(cfg), storage)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, "dataset.json")
    fs.pipe_file(path, json.dumps(document, indent=2).encode())
    return fs.unstrip_protocol(path)


def write_mapping_part(cfg: WeakConfig, n: int, rows: list[dict], storage: StorageOptions | None) -> None:
    fs, root = filesystem_for(join(cfg.work, "mapping"), storage)
    fs.makedirs(root, exist_ok=True)
    sink = pa.BufferOutputStream()
    columns = {name: [r.get(name) for r in rows] for name in MAPPING_SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(columns, schema=MAPPING_SCHEMA), sink)
    fs.pipe_file(posixpath.join(root, f"part-{n:05d}.parquet"), sink.getvalue().to_pybytes())


def read_mapping(work: str, storage: StorageOptions | None) -> pa.Table:
    fs, root = filesystem_for(join(work, "mapping"), storage)
    try:
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        paths = []
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, schema=MAPPING_SCHEMA))
    return pa.concat_tables(tables) if tables else MAPPING_SCHEMA.empty_table()


# -- driver ----------------------------------------------------------------------------------------

CASES_PER_TASK, TASKS_IN_FLIGHT = 8, 4
CASES_PER_VOLUME_TASK = 2  # whole volumes: a few hundred MB each in float32


def _slice_info(source: str, target: str, case_ids: set[str], storage: StorageOptions | None) -> dict:
    table = Catalog(source, storage=storage).slices(["case_id", "target", "slice_index", "sam_score", "boxes_xyxy"])
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        if row["target"] == target and row["case_id"] in case_ids:
            out.setdefault(row["case_id"], []).append(row)
    return out


def export_dataset(cfg: WeakConfig, selection, *, storage: StorageOptions | None, progress=print,
                   configuration: Configuration | str = Configuration.TWO_D) -> dict:  # fmt: skip
    """Write the raw dataset and mapping for `selection` (a select.Selection) with Ray tasks, in
    `configuration` (2d: PNG slices; 3d_fullres: NIfTI volumes, export3d.py); returns the export record
    (counts, drops, where things are). Replaces an earlier export under WORK."""
    import ray

    configuration = Configuration(configuration)
    if configuration == Configuration.AUTO:
        raise ValueError("export_dataset: resolve the configuration first (export3d.resolve_configuration)")
    three_d = configuration == Configuration.THREE_D

    for folder in (raw_folder(cfg), join(cfg.work, "mapping")):
        fs, root = filesystem_for(folder, storage)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    slices = _slice_info(cfg.source, cfg.target, {c["case_id"] for c in selection.cases}, storage)
    task = ray.remote(num_cpus=0.5)(export_volume_cases if three_d else export_cases)
    per_task = CASES_PER_VOLUME_TASK if three_d else CASES_PER_TASK
    chunks = [selection.cases[i : i + per_task] for i in range(0, len(selection.cases), per_task)]
    pending, n_images, n_parts, cases_used = [], 0, 0, set()
    dropped: Counter = Counter()
    modalities: list[str] = []
    ignored = 0

    def drain(block: bool) -> None:
        nonlocal pending, n_images, n_parts, ignored
        while pending and (block or len(pending) >= TASKS_IN_FLIGHT):
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            dropped.update(result["dropped"])
            modalities.extend(result.get("modalities", []))
            ignored += result.get("ignored", 0)
            if result["rows"]:
                write_mapping_part(cfg, n_parts, result["rows"], storage)
                n_parts += 1
                n_images += len(result["rows"])
                cases_used.update(r["case_id"] for r in result["rows"])

    extra = {"raw": raw_folder(cfg)} if three_d else {}
    for chunk in chunks:
        pending.append(task.remote(chunk, {c["case_id"]: slices.get(c["case_id"], []) for c in chunk},
                                   cfg=cfg, storage=storage, **extra))  # fmt: skip
        drain(block=False)
    drain(block=True)
    what = "volume(s)" if three_d else "image(s)"
    progress(f"exported {n_images} pseudo-labelled {what} of {len(cases_used)} case(s) to {raw_folder(cfg)} "
             f"({configuration.value})")  # fmt: skip
    record = {"configuration": configuration.value}
    if three_d:
        channel = channel_name(cfg.export.modality, modalities)
        document = dataset_json_3d(cfg, n_images, channel, with_ignore=ignored > 0)
        record.update(channel=channel, modalities=dict(Counter(m or "unknown" for m in modalities)),
                      slices_ignored=ignored)  # fmt: skip
    else:
        document = dataset_json_2d(cfg, n_images)
    dataset_json = write_dataset_json(cfg, document, storage) if n_images else None
    return {"images": n_images, "cases": len(cases_used), "slices_dropped": dict(dropped),
            "raw": raw_folder(cfg), "dataset_json": dataset_json, "mapping": join(cfg.work, "mapping"),
            **record}  # fmt: skip
