"""`train_weak`: a segmentation run's masks -> pseudo-labels -> an nnU-Net checkpoint ensemble, on Ray.

    result = train_weak(load_weak_config(source="out/", target="lesion", work="s3://b/weak"), storage=s)

    WORK/selection.json              the filters and what they kept / dropped (cases and slices), the
                                     training's identity and each label's key (identity.py)
    WORK/training.json               the latest run's decision: a new training or the last one reused
    WORK/nnUNet_raw/<Dataset>/       the exported pseudo-labels (export.py), WORK/mapping/ back to slices
    WORK/nnUNet_preprocessed/<Dataset>/  nnU-Net's plans and preprocessed data (a Ray task made them)
    WORK/checkpoints/<run.name>/     Ray Train's resume points (checkpoint_<epoch>/member_<r>/...)
    WORK/ensemble/*.pt               the ensemble: every kept epoch of every member (state dicts)
    WORK/ensemble/ensemble.json      what refinement needs: plans, dataset.json, members with sha256

The training's identity (identity.py) is the config hash and a digest of the selected pseudo-labels as
the catalog holds them now: run it again with the same config and the same labels (after an
interruption, or a nightly run that added nothing it selects) and the selection, export and
preprocessing are reused and training resumes from the newest checkpoint (or is already done); new,
changed or removed labels start a new training (a new export, the last training's checkpoints and
ensemble replaced). WORK/training.json says which, with the counts:

    "new training: 14 labels (10 new, 0 changed, 0 removed since 3f2a...)"
    "reusing training 3f2a...: labels unchanged"
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
from mcs_batch.train.weak.export3d import resolve_configuration
from mcs_batch.train.weak.files import download_folder, exists, read_bytes, sha256, upload_folder, write_bytes
from mcs_batch.train.weak.identity import SELECTION_FILE, TrainingPlan, plan_training
from mcs_batch.train.weak.loop import STATE_FILE, ensemble_folder, member_loop, preprocessed_folder, transfer_record
from mcs_batch.train.weak.nnunet_env import PREPROCESSED, RAW, NnunetStage, nnunet_environment
from mcs_batch.train.weak.resources import resolve_weak_resources, weak_cluster_view

PREPARED_FILE = "mcs_batch_prepared.json"
DECISION_FILE = "training.json"  # the latest decision: a new training or a reused one


class TrainWeakError(RuntimeError):
    """Training did not finish (a worker failed or the run was interrupted); run again to resume."""


def train_weak(cfg: WeakConfig, *, storage: StorageOptions | None = None,
               progress: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Select, export, prepare, train; returns the ensemble record (also WORK/ensemble/ensemble.json)
    with "decision" (identity.TrainingPlan.record: a new training, or the last one reused). Ray must be
    reachable. ConfigError for bad inputs, TrainWeakError when training fails (resumable)."""
    cfg.check_required()
    start = time.perf_counter()
    config_hash = cfg.hash()
    resume = newest_checkpoint_state(cfg, storage)
    if resume is not None and resume.get("config_hash") != config_hash:
        raise ConfigError(
            f"run.name {cfg.run.name!r} under {cfg.work} has checkpoints of another configuration (hash "
            f"{resume.get('config_hash')}, now {config_hash}): use another run.name or another --work"
        )
    plan = plan_training(cfg, storage=storage)
    selection = plan.selection
    progress(f"selected {len(selection.cases)} of {selection.considered} case(s) of target {cfg.target}: "
             f"dropped {dict(selection.dropped) or 'none'}")  # fmt: skip
    if not selection.considered:
        raise ConfigError(f"{cfg.source}: no catalog rows of target {cfg.target!r}")
    progress(plan.line)
    identity = plan.identity
    configuration = resolve_configuration(cfg.configuration, selection.cases).value
    if plan.reuse:
        progress(f"reusing the selection and export in {cfg.work} ({plan.previous['export']['images']} images)")
    else:
        if plan.previous is None and resume is not None:
            raise ConfigError(f"{join(cfg.work, SELECTION_FILE)} is missing, but checkpoints exist")
        _export(cfg, storage, progress, plan, configuration)
        resume = None  # the checkpoints and ensemble of the last training were cleared
    _write_decision(cfg, storage, plan)
    if resume is not None and resume.get("epoch") == cfg.train.total_epochs:
        done = _read_json(join(ensemble_folder(cfg), "ensemble.json"), storage)
        if done is not None and done.get("identity") == identity:
            progress(f"run {cfg.run.name} under {cfg.work} is already trained ({len(done['members'])} checkpoints)")
            return {**done, "decision": plan.record(), "seconds": round(time.perf_counter() - start, 1)}
    resources = resolve_weak_resources(cfg, weak_cluster_view())
    _prepare(cfg, storage, progress, identity, resources.plan_processes, configuration)
    if resume is None:
        _clear(ensemble_folder(cfg), storage)  # members of an older run under this WORK
    else:
        progress(f"resuming run {cfg.run.name} after epoch {resume.get('epoch')}")
    summaries = _fit(cfg, storage, config_hash, identity, resources.augmentation_processes, configuration)
    ensemble = _write_ensemble(cfg, storage, plan, summaries, configuration)
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


def _export(cfg: WeakConfig, storage, progress, plan: TrainingPlan, configuration: str) -> dict:
    """Export the plan's selection in `configuration`; then clear the last training's checkpoints and
    ensemble, and write WORK/selection.json (the new identity: from here on, training resumes under it)."""
    export = export_dataset(cfg, plan.selection, storage=storage, progress=progress, configuration=configuration)
    if export["images"] < 2:
        raise ConfigError(f"only {export['images']} pseudo-label(s) passed the filters ({plan.selection.record()}, "
                          f"slices dropped {export['slices_dropped']}); loosen select.* or check the run")  # fmt: skip
    _clear(join(cfg.work, "checkpoints", cfg.run.name), storage)
    _clear(ensemble_folder(cfg), storage)
    record = {"config_hash": plan.config_hash, "identity": plan.identity, "source": cfg.source,
              "target": cfg.target, "filters": cfg.to_dict()["select"], "cases": plan.selection.record(),
              "export": export, "case_ids": list(plan.labels), "labels": plan.labels,
              "changes": plan.changes.to_dict(), "written_at": time.time()}  # fmt: skip
    write_bytes(join(cfg.work, SELECTION_FILE), json.dumps(record, indent=2).encode(), storage)
    return record


def _write_decision(cfg: WeakConfig, storage, plan: TrainingPlan) -> None:
    """WORK/training.json: what the latest train-weak decided (a new training or a reused one), and when."""
    document = {**plan.record(), "work": cfg.work, "run_name": cfg.run.name, "decided_at": time.time()}
    write_bytes(join(cfg.work, DECISION_FILE), json.dumps(document, indent=2).encode(), storage)


def _prepare(cfg: WeakConfig, storage, progress, identity: str, processes: int, configuration: str) -> None:
    """nnU-Net fingerprint, plans and preprocessing (of `configuration`) in a Ray task, nnU-Net running
    `processes` worker processes (-np / -npfp); the result goes to WORK."""
    import ray

    marker = _read_json(join(preprocessed_folder(cfg), PREPARED_FILE), storage)
    if marker and marker.get("identity") == identity:
        return
    progress(f"nnU-Net planning and preprocessing ({configuration}, {processes} process(es))")
    _clear(preprocessed_folder(cfg), storage)
    # One CPU reserved, the planner's processes beside it: a task asking for a node's every CPU would
    # wait for good behind any actor holding one (planning runs before training, alone).
    task = ray.remote(num_cpus=1)(plan_and_preprocess)
    ray.get(task.remote(cfg, storage, identity, processes, configuration))


def plan_and_preprocess(cfg: WeakConfig, storage: StorageOptions | None, identity: str, processes: int = 1,
                        configuration: str = "2d") -> None:  # fmt: skip
    """Ray task body: raw dataset from WORK -> scratch, nnU-Net's planner in a subprocess (its own
    environment, from nnunet_env), plans adjusted (train.base_features), preprocessed data -> WORK."""
    with tempfile.TemporaryDirectory(prefix="mcs-weak-plan-", dir=cfg.run.scratch_dir or None) as scratch:
        env = nnunet_environment(scratch, stage=NnunetStage.PLAN, n_proc=processes)
        download_folder(raw_folder(cfg), Path(env[RAW]) / cfg.dataset_name, storage,
                        connections=cfg.run.transfer_connections)  # fmt: skip
        code = ("from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry\n"
                "plan_and_preprocess_entry()\n")  # fmt: skip
        args = ["-d", str(cfg.export.dataset_id), "-c", configuration, "-np", str(processes), "-npfp", str(processes),
                "--verify_dataset_integrity"]  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True,
                              text=True, check=False)  # fmt: skip
        if done.returncode:
            tail = (done.stdout + done.stderr)[-2000:]
            raise RuntimeError(f"nnU-Net planning / preprocessing failed (exit {done.returncode}):\n{tail}")
        local = Path(env[PREPROCESSED]) / cfg.dataset_name
        if cfg.train.base_features:
            _shrink_network(local / f"{cfg.train.plans}.json", cfg.train.base_features, configuration)
        (local / PREPARED_FILE).write_text(json.dumps({"identity": identity}))
        upload_folder(local, preprocessed_folder(cfg), storage, connections=cfg.run.transfer_connections)


def _shrink_network(plans_path: Path, base: int, configuration: str) -> None:
    plans = json.loads(plans_path.read_text())
    kwargs = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [min(base * 2**i, f) for i, f in enumerate(kwargs["features_per_stage"])]
    plans_path.write_text(json.dumps(plans, indent=2))


def _fit(cfg: WeakConfig, storage, config_hash: str, identity: str, augmentation_processes: int,
         configuration: str) -> list[dict]:  # fmt: skip
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = ray_train_storage(join(cfg.work, "checkpoints"), storage)
    trainer = TorchTrainer(
        member_loop,
        train_loop_config={
            "cfg": cfg,
            "storage": storage,
            "config_hash": config_hash,
            "identity": identity,  # keys the node cache of the preprocessed files (worker_data.py)
            "configuration": configuration,
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


def _write_ensemble(cfg: WeakConfig, storage, plan: TrainingPlan, summaries: list[dict], configuration: str) -> dict:
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
        "config_hash": plan.config_hash,
        "identity": plan.identity,  # the configuration and the labels (identity.py)
        "decision": plan.record(),
        "source": cfg.source,
        "target": cfg.target,
        "dataset": cfg.dataset_name,
        "configuration": configuration,
        "trainer": cfg.train.trainer,
        "plans": join(preprocessed_folder(cfg), f"{cfg.train.plans}.json"),
        "dataset_json": join(preprocessed_folder(cfg), "dataset.json"),
        "mirroring_axes": summary.get("mirroring_axes", []),
        "members": members,
        "training": summary,
        # what each worker downloaded of the preprocessed dataset (the workers of a node share one download)
        "transfers": [t for r in range(cfg.run.num_workers) if (t := _read_json(transfer_record(cfg, r), storage))],
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
