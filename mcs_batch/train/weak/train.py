"""`train_weak`: a segmentation run's masks -> pseudo-labels -> an nnU-Net checkpoint ensemble, on Ray.

    result = train_weak(load_weak_config(source="out/", target="lesion", work="s3://b/weak"), storage=s)

    WORK/selection.json              the filters and what they kept / dropped (cases and slices)
    WORK/nnUNet_raw/<Dataset>/       the exported pseudo-labels (export.py), WORK/mapping/ back to slices
    WORK/nnUNet_preprocessed/<Dataset>/  nnU-Net's plans and preprocessed data (a Ray task made them)
    WORK/checkpoints/<run.name>/     Ray Train's resume points (checkpoint_<epoch>/member_<r>/...)
    WORK/ensemble/*.pt               the ensemble: every kept epoch of every member (state dicts)
    WORK/ensemble/ensemble.json      what refinement needs: plans, dataset.json, members with sha256

Run it again with the same config after an interruption: selection, export and preprocessing are
reused (their config hash matches), and training resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, join, ray_train_storage
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.train.weak.config import WeakConfig
from mcs_batch.train.weak.export import export_dataset, raw_folder
from mcs_batch.train.weak.files import download_folder, exists, read_bytes, sha256, upload_folder, write_bytes
from mcs_batch.train.weak.loop import CONFIGURATION, STATE_FILE, ensemble_folder, member_loop, preprocessed_folder
from mcs_batch.train.weak.nnunet_env import PREPROCESSED, RAW, NnunetStage, nnunet_environment
from mcs_batch.train.weak.resources import resolve_weak_resources, weak_cluster_view
from mcs_batch.train.weak.select import select_from_catalog

PREPARED_FILE = "mcs_batch_prepared.json"


class TrainWeakError(RuntimeError):
    """Training did not finish (a worker failed or the run was interrupted); run again to resume."""


def train_weak(cfg: WeakConfig, *, storage: StorageOptions | None = None,
               progress: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Select, export, prepare, train; returns the ensemble record (also WORK/ensemble/ensemble.json).
    Ray must be reachable. ConfigError for bad inputs, TrainWeakError when training fails (resumable)."""
    cfg.check_required()
    start = time.perf_counter()
    config_hash = cfg.hash()
    resume = newest_checkpoint_state(cfg, storage)
    if resume is not None and resume.get("config_hash") != config_hash:
        raise ConfigError(
            f"run.name {cfg.run.name!r} under {cfg.work} has checkpoints of another configuration (hash "
            f"{resume.get('config_hash')}, now {config_hash}): use another run.name or another --work"
        )
    selection_uri = join(cfg.work, "selection.json")
    record = _read_json(selection_uri, storage)
    if record is None or record.get("config_hash") != config_hash:
        if resume is not None:
            raise ConfigError(f"{selection_uri} is missing or of another configuration, but checkpoints exist")
        record = _select_and_export(cfg, storage, progress, config_hash)
    else:
        progress(f"reusing the selection and export in {cfg.work} ({record['export']['images']} images)")
    if resume is not None and resume.get("epoch") == cfg.train.total_epochs:
        done = _read_json(join(ensemble_folder(cfg), "ensemble.json"), storage)
        if done is not None and done.get("config_hash") == config_hash:
            progress(f"run {cfg.run.name} under {cfg.work} is already trained ({len(done['members'])} checkpoints)")
            return done
    resources = resolve_weak_resources(cfg, weak_cluster_view())
    _prepare(cfg, storage, progress, config_hash, resources.plan_processes)
    if resume is None:
        _clear(ensemble_folder(cfg), storage)  # members of an older run under this WORK
    else:
        progress(f"resuming run {cfg.run.name} after epoch {resume.get('epoch')}")
    summaries = _fit(cfg, storage, config_hash, resources.augmentation_processes)
    ensemble = _write_ensemble(cfg, storage, config_hash, summaries)
    ensemble["seconds"] = round(time.perf_counter() - start, 1)
    ensemble["resources"] = resources.to_dict()
    progress(f"ensemble of {len(ensemble['members'])} checkpoint(s) written to {ensemble_folder(cfg)}")
    return ensemble


def check_source(cfg: WeakConfig, storage: StorageOptions | None) -> int:
    """ConfigError (before any Ray work) when OUT has no committed row of the target; else how many."""
    targets = Catalog(cfg.source, storage=storage).cases(["target"]).column("target").to_pylist()
    if not targets:
        raise ConfigError(f"--from {cfg.source}: no catalog there (OUT/catalog/cases is empty or missing)")
    n = sum(1 for t in targets if t == cfg.target)
    if not n:
        raise ConfigError(f"--target {cfg.target}: {cfg.source} has targets {', '.join(sorted(set(targets)))}")
    return n


def _select_and_export(cfg: WeakConfig, storage, progress, config_hash: str) -> dict:
    catalog = Catalog(cfg.source, storage=storage)
    selection = select_from_catalog(catalog, cfg.target, cfg.select, storage=storage)
    progress(f"selected {len(selection.cases)} of {selection.considered} case(s) of target {cfg.target}: "
             f"dropped {dict(selection.dropped) or 'none'}")  # fmt: skip
    if not selection.considered:
        raise ConfigError(f"{cfg.source}: no catalog rows of target {cfg.target!r}")
    export = export_dataset(cfg, selection, storage=storage, progress=progress)
    if export["images"] < 2:
        raise ConfigError(f"only {export['images']} pseudo-label(s) passed the filters ({selection.record()}, "
                          f"slices dropped {export['slices_dropped']}); loosen select.* or check the run")  # fmt: skip
    record = {"config_hash": config_hash, "source": cfg.source, "target": cfg.target,
              "filters": cfg.to_dict()["select"], "cases": selection.record(), "export": export,
              "case_ids": [c["case_id"] for c in selection.cases], "written_at": time.time()}  # fmt: skip
    write_bytes(join(cfg.work, "selection.json"), json.dumps(record, indent=2).encode(), storage)
    return record


def _prepare(cfg: WeakConfig, storage, progress, config_hash: str, processes: int) -> None:
    """nnU-Net fingerprint, plans and preprocessing (2d) in a Ray task of `processes` CPUs (nnU-Net's
    -np / -npfp); the result goes to WORK."""
    import ray

    marker = _read_json(join(preprocessed_folder(cfg), PREPARED_FILE), storage)
    if marker and marker.get("config_hash") == config_hash:
        return
    progress(f"nnU-Net planning and preprocessing (2d, {processes} process(es))")
    _clear(preprocessed_folder(cfg), storage)
    task = ray.remote(num_cpus=processes)(plan_and_preprocess)
    ray.get(task.remote(cfg, storage, config_hash, processes))


def plan_and_preprocess(cfg: WeakConfig, storage: StorageOptions | None, config_hash: str, processes: int = 1) -> None:
    """Ray task body: raw dataset from WORK -> scratch, nnU-Net's planner in a subprocess (its own
    environment, from nnunet_env), plans adjusted (train.base_features), preprocessed data -> WORK."""
    with tempfile.TemporaryDirectory(prefix="mcs-weak-plan-", dir=cfg.run.scratch_dir or None) as scratch:
        env = nnunet_environment(scratch, stage=NnunetStage.PLAN, n_proc=processes)
        download_folder(raw_folder(cfg), Path(env[RAW]) / cfg.dataset_name, storage)
        code = ("from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry\n"
                "plan_and_preprocess_entry()\n")  # fmt: skip
        args = ["-d", str(cfg.export.dataset_id), "-c", CONFIGURATION, "-np", str(processes), "-npfp", str(processes),
                "--verify_dataset_integrity"]  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True,
                              text=True, check=False)  # fmt: skip
        if done.returncode:
            tail = (done.stdout + done.stderr)[-2000:]
            raise RuntimeError(f"nnU-Net planning / preprocessing failed (exit {done.returncode}):\n{tail}")
        local = Path(env[PREPROCESSED]) / cfg.dataset_name
        if cfg.train.base_features:
            _shrink_network(local / f"{cfg.train.plans}.json", cfg.train.base_features)
        (local / PREPARED_FILE).write_text(json.dumps({"config_hash": config_hash}))
        upload_folder(local, preprocessed_folder(cfg), storage)


def _shrink_network(plans_path: Path, base: int) -> None:
    plans = json.loads(plans_path.read_text())
    kwargs = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [min(base * 2**i, f) for i, f in enumerate(kwargs["features_per_stage"])]
    plans_path.write_text(json.dumps(plans, indent=2))


def _fit(cfg: WeakConfig, storage, config_hash: str, augmentation_processes: int) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = ray_train_storage(join(cfg.work, "checkpoints"), storage)
    trainer = TorchTrainer(
        member_loop,
        train_loop_config={
            "cfg": cfg,
            "storage": storage,
            "config_hash": config_hash,
            "augmentation_processes": augmentation_processes,  # nnUNet_n_proc_DA (resources.py)
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train wraps worker errors
        first = (str(e).strip().splitlines() or [""])[0]
        raise TrainWeakError(
            f"training did not finish ({type(e).__name__}: {first}); run the same command again to resume from "
            f"the last checkpoint under {join(cfg.work, 'checkpoints', cfg.run.name)}"
        ) from e
    value = result.return_value
    return value if isinstance(value, list) else [value] if value else []


def _write_ensemble(cfg: WeakConfig, storage, config_hash: str, summaries: list[dict]) -> dict:
    fs, root = filesystem_for(ensemble_folder(cfg), storage)
    fs.invalidate_cache(root)
    members = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/member*.pt")):
        name = path.rsplit("/", 1)[-1]
        members.append({"file": name, "sha256": sha256(fs.cat_file(path))})
    if not members:
        raise TrainWeakError(f"training finished but {ensemble_folder(cfg)} holds no ensemble checkpoint")
    summary = summaries[0] if summaries else {}
    document = {
        "format": 1,
        "config_hash": config_hash,
        "source": cfg.source,
        "target": cfg.target,
        "dataset": cfg.dataset_name,
        "configuration": CONFIGURATION,
        "trainer": cfg.train.trainer,
        "plans": join(preprocessed_folder(cfg), f"{cfg.train.plans}.json"),
        "dataset_json": join(preprocessed_folder(cfg), "dataset.json"),
        "mirroring_axes": summary.get("mirroring_axes", []),
        "members": members,
        "training": summary,
        "config": cfg.to_dict(),
    }
    write_bytes(join(ensemble_folder(cfg), "ensemble.json"), json.dumps(document, indent=2).encode(), storage)
    return document


def newest_checkpoint_state(cfg: WeakConfig, storage: StorageOptions | None) -> dict | None:
    """member_00's state.json in the newest resume point of run.name (None: a new run)."""
    fs, root = filesystem_for(join(cfg.work, "checkpoints", cfg.run.name), storage)
    try:
        fs.invalidate_cache(root)
        states = sorted(fs.glob(f"{root.rstrip('/')}/checkpoint_*/member_00/{STATE_FILE}"))
        return json.loads(fs.cat_file(states[-1])) if states else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg.work}: cannot read the checkpoints of run {cfg.run.name} ({e})") from e


def _read_json(uri: str, storage) -> dict | None:
    if not exists(uri, storage):
        return None
    return json.loads(read_bytes(uri, storage))


def _clear(uri: str, storage) -> None:
    fs, path = filesystem_for(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
