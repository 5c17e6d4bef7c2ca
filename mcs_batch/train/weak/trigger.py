"""The trigger: a segmentation job that has committed submits the retraining job to its cluster.

    submission_id = submit_after_segment("s3://b/out", "lesion", "s3://b/weak/lesion",
                                         address="http://head:8265", overrides=["run.num_workers=4"])

The retraining runs as its own Ray job (`python -m mcs_batch.cli train-weak ... --refine`), so the
segmentation job finishes without waiting for it, and a failed training is resumed by submitting
again. The job's image must have mcs-batch installed (as for the segmentation job).

`planned_training` says beforehand what that job will do with the catalog as it is now (a new training
and how many labels are new, changed or removed, or the last training reused); the segmentation job
keeps it in its run record beside the submission.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from mcs_batch.io.storage import StorageOptions


def train_weak_entrypoint(out: str, target: str, work: str, *, config: str | None = None,
                          overrides: Sequence[str] = (), refine: bool = True) -> str:  # fmt: skip
    """The shell command of the retraining job."""
    args = ["python", "-m", "mcs_batch.cli", "train-weak", "--from", out, "--target", target, "--work", work]
    if config:
        args += ["--config", config]
    for item in overrides:
        args += ["--set", item]
    if refine:
        args.append("--refine")
    return shlex.join(args)


def submit_after_segment(out: str, target: str, work: str, *, address: str, config: str | None = None,
                         overrides: Sequence[str] = (), refine: bool = True, client=None,
                         env_vars: dict | None = None) -> str:  # fmt: skip
    """Submit `train-weak` for (out, target) to the Ray cluster at `address` (its dashboard / job API,
    e.g. http://127.0.0.1:8265); returns the submission id. `client`: a JobSubmissionClient (tests)."""
    if client is None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
    entrypoint = train_weak_entrypoint(out, target, work, config=config, overrides=overrides, refine=refine)
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                             metadata={"mcs_batch": "train-weak", "source": out, "target": target})  # fmt: skip


def planned_training(out: str, target: str, work: str, *, config: str | None = None, overrides: Sequence[str] = (),
                     storage: StorageOptions | None = None) -> dict:  # fmt: skip
    """What `train-weak` for (out, target, work) will decide with the catalog as it is now: the
    training's identity, "decision" ("new training: N labels (M new, K changed, J removed since <id>)"
    or "reusing training <id>: labels unchanged") and the label counts. Reads the catalog and
    WORK/selection.json only (no Ray)."""
    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.identity import plan_training

    cfg = load_weak_config(config, overrides=list(overrides), source=out, target=target, work=work)
    return plan_training(cfg, storage=storage).record()
