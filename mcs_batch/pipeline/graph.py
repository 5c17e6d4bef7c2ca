"""The Ray Data graph of the job, from case rows to per-slice results (lazy until consumed).

    plan (tasks) -> load (CPU tasks) -> saliency (actor pool) -> prompts (CPU tasks) -> masking (actor pool)

Every stage's function lives in mcs_batch.stages; this module only wires them with their resources.
"""

from __future__ import annotations

from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions
from mcs_batch.stages.load import load_batch, plan_batch
from mcs_batch.stages.masking import SamStage
from mcs_batch.stages.prompts import prompts_batch
from mcs_batch.stages.saliency import SaliencyStage


def _model_stage(rows, stage, cfg: JobConfig, storage, *, batch: int, actors: int, cpus: float, gpus: float):
    """An actor pool that loads its model once per actor; a crashed actor is restarted and its batch
    retried, so no case is lost or duplicated."""
    import ray

    return rows.map_batches(
        stage,
        fn_constructor_kwargs={"cfg": cfg, "storage": storage},
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
        max_restarts=-1,
        max_task_retries=-1,
    )


def build_pipeline(cases, cfg: JobConfig, *, storage: StorageOptions | None, skip: frozenset[str]):
    """The Ray Data graph from case rows to per-slice results (lazy; nothing runs until consumed)."""
    res = cfg.resources
    rows = cases.flat_map(plan_batch, fn_kwargs={"cfg": cfg, "skip": skip}, num_cpus=0.25)
    rows = rows.map_batches(
        load_batch, fn_kwargs={"cfg": cfg, "storage": storage}, batch_size=1, num_cpus=res.load_cpus
    )
    rows = _model_stage(rows, SaliencyStage, cfg, storage, batch=res.saliency_batch, actors=res.saliency_actors,
                        cpus=res.saliency_cpus, gpus=res.saliency_gpus)  # fmt: skip
    rows = rows.map_batches(
        prompts_batch, fn_kwargs={"cfg": cfg}, batch_size=res.saliency_batch, num_cpus=res.prompts_cpus
    )
    return _model_stage(rows, SamStage, cfg, storage, batch=res.sam_batch, actors=res.sam_actors,
                        cpus=res.sam_cpus, gpus=res.sam_gpus)  # fmt: skip
