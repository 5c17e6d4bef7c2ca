"""What a training worker reads of nnU-Net's preprocessed dataset, fetched once per node.

nnU-Net v2 (2.8, `nnUNetTrainer`) training fold "all" without its final validation reads, under
`nnUNet_preprocessed/<Dataset>/`:

    <plans>.json                  the plans (build_trainer loads them)
    dataset.json                  labels and channels (build_trainer)
    dataset_fingerprint.json      copied to the results folder by `on_train_start`
    <data_identifier>/            the configuration's cases (`nnUNetPlans_2d/`: *.b2nd, *_seg.b2nd, *.pkl),
                                  opened read-only (blosc2 memory maps; `unpack_dataset` is a no-op)

and nothing else: `gt_segmentations/` is read only by `perform_actual_validation` (never called here),
`splits_final.json` only for folds other than "all", other configurations' data folders never.

`fetch_preprocessed` puts those files in a node-local cache folder keyed by WORK, the training's
identity and the configuration; the workers of one node take a file lock in turn: the first downloads
(bounded parallel transfers, files.py), the others find every file there with its size and download
nothing. An interrupted download resumes where it stopped. Each fetch marks its folder as used; folders
of other trainings not fetched for CACHE_KEEP_S are removed then, so that a node kept for years of
nightly retrainings does not fill its disk with their datasets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.train.weak.files import TransferReport, download_folder, locked, read_bytes

CACHE_FOLDER = "mcs-weak-preprocessed"  # under run.scratch_dir (default: the system temp folder)
ALWAYS = ("dataset.json", "dataset_fingerprint.json")
CACHE_KEEP_S = 7 * 86400  # a training's cached files not fetched for this long are removed (no training lasts it)
USED_FILE = ".used"  # in a cache folder: touched by every fetch


def training_files(plans: dict, configuration: str, plans_name: str) -> Callable[[str], bool]:
    """keep(relative path) for the files a worker training `configuration` of these plans reads."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data = PlansManager(plans).get_configuration(configuration).data_identifier
    top = {f"{plans_name}.json", *ALWAYS}
    return lambda rel: rel in top or rel.startswith(f"{data}/")


def cache_folder(scratch_dir: str, work: str, identity: str, configuration: str) -> Path:
    """The node-local folder holding `nnUNet_preprocessed/<Dataset>/` of this training."""
    key = hashlib.sha256(json.dumps([work, identity, configuration]).encode()).hexdigest()[:16]
    return Path(scratch_dir or tempfile.gettempdir()) / CACHE_FOLDER / key


def fetch_preprocessed(preprocessed_uri: str, dataset_folder: Path, storage: StorageOptions | None, *,
                       plans_name: str, configuration: str, connections: int) -> TransferReport:  # fmt: skip
    """The files `configuration` trains on, from WORK's `preprocessed_uri` into `dataset_folder`
    (`<cache>/nnUNet_preprocessed/<Dataset>`), under the node's lock on the cache."""
    folder = dataset_folder.parent.parent  # <cache>/<key>
    with locked(folder / ".lock"):
        (folder / USED_FILE).touch()
        plans = json.loads(read_bytes(join(preprocessed_uri, f"{plans_name}.json"), storage))
        keep = training_files(plans, configuration, plans_name)
        report = download_folder(preprocessed_uri, dataset_folder, storage, connections=connections, keep=keep)
    prune_cache(folder.parent, keep=folder)
    return report


def prune_cache(root: Path, *, keep: Path, max_age_s: float = CACHE_KEEP_S, now: float | None = None) -> list[str]:
    """Remove the cache folders under `root` other than `keep` whose last fetch is older than `max_age_s`
    (a folder without the mark counts from its own time); returns their names."""
    now = time.time() if now is None else now
    removed = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p != keep):
        mark = folder / USED_FILE
        try:
            used = (mark if mark.exists() else folder).stat().st_mtime
        except FileNotFoundError:  # another node process removed it meanwhile
            continue
        if now - used > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed
