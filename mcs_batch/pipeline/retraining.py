"""The weak-supervision trigger at the end of a segmentation job (one driver, or the parent of shard
drivers: once for the whole job)."""

from __future__ import annotations

from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions, join


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
