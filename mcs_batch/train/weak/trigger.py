"""The trigger: a segmentation job that has committed submits the retraining job to its cluster.

    submission_id = submit_after_segment("s3://b/out", "lesion", "s3://b/weak/lesion",
                                         address="http://head:8265", overrides=["run.num_workers=4"])

The retraining runs as its own Ray job (`python -m mcs_batch.cli train-weak ... --refine`), so the
segmentation job finishes without waiting for it, and a failed training is resumed by submitting
again. The job's image must have mcs-batch installed (as for the segmentation job).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


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
