"""What a segmentation job does at its end, once for the whole job (its one driver, or the parent of
its shard drivers): the tables' upkeep and the weak-supervision trigger."""

from __future__ import annotations

from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.outputs.maintenance import maintain


def store_segs(catalog, cfg: JobConfig, run_id: str, progress) -> dict | None:
    """outputs.dicomweb_store: send the committed SEGs not yet stored (this run's, and what earlier runs
    failed to store) by STOW-RS, each answer recorded in the stored table (outputs/pacs_store.py). Never
    fails the job: a store that failed is tried again by the next run."""
    if not cfg.outputs.dicomweb_store:
        return None
    from mcs_batch.outputs.pacs_store import store_committed_segs

    try:
        done = store_committed_segs(catalog, cfg.outputs.dicomweb_store, run_id=run_id)
    except Exception as e:
        progress(f"SEGs not stored to {cfg.outputs.dicomweb_store} ({type(e).__name__}: {e}); the next run tries again")
        return {"error": f"{type(e).__name__}: {e}"}
    failed = sum(done["failed"].values())
    progress(f"stored {done['stored']} SEG(s) to {cfg.outputs.dicomweb_store}"
             + (f"; {failed} failed ({done['failed']}), tried again by the next run" if failed else ""))  # fmt: skip
    return done


def maintain_tables(catalog, cfg: JobConfig, index_uri: str, progress) -> dict:
    """At the end of a job: compact the tables that gathered many small files and vacuum every table
    (outputs/maintenance.py). Never fails the job: what it could not do, the next job or `mcs-batch
    catalog compact|vacuum` does."""
    try:
        done = maintain(catalog, min_files=cfg.outputs.compact_min_files, index=index_uri)
    except Exception as e:
        progress(f"table upkeep skipped ({type(e).__name__}: {e})")
        return {"error": f"{type(e).__name__}: {e}"}
    for name, result in done.items():
        if "files_before" in result:
            progress(f"compacted the {name} table: {result['files_before']} -> {result['files_after']} file(s)")
        if result.get("vacuumed"):
            progress(f"vacuumed the {name} table: {result['vacuumed']} file(s) removed a week ago deleted")
    return done


def submit_retraining(cfg: JobConfig, summary, progress, storage: StorageOptions | None) -> list[dict]:
    """The weak-supervision trigger: one `train-weak --refine` Ray job per target, when this run
    committed new ok cases, each recorded with what it will decide ("training": a new training and its
    label counts, or the last one reused). A failed submission is recorded and said, never a failed
    segmentation."""
    from mcs_batch.train.weak.trigger import planned_training, submit_after_segment

    if not summary.by_status.get("ok"):
        progress("weak.enabled: no new ok case in this run, so no retraining was submitted")
        return []
    jobs = []
    for target in cfg.targets:
        work = cfg.weak.work or join(cfg.outputs.uri, "weak", target.name)
        try:
            training = planned_training(cfg.outputs.uri, target.name, work, config=cfg.weak.config or None,
                                        overrides=cfg.weak.overrides, storage=storage)  # fmt: skip
            progress(f"weakly supervised retraining of {target.name}: {training['decision']}")
        except Exception as e:  # what it will do is information; the submission goes ahead
            training = {"error": f"{type(e).__name__}: {e}"}
        try:
            sid = submit_after_segment(cfg.outputs.uri, target.name, work, address=cfg.weak.address,
                                       config=cfg.weak.config or None, overrides=cfg.weak.overrides,
                                       refine=cfg.weak.refine)  # fmt: skip
            jobs.append({"target": target.name, "work": work, "submission_id": sid, "training": training})
            progress(f"submitted weakly supervised retraining of {target.name} to {cfg.weak.address}: {sid}")
        except Exception as e:  # the segmentation is committed whatever happens here
            error = f"{type(e).__name__}: {e}"
            jobs.append({"target": target.name, "work": work, "error": error, "training": training})
            progress(f"could not submit the retraining of {target.name} to {cfg.weak.address}: {e}")
    return jobs
