"""The Ray Data graph of the job, from case rows to per-part rows (lazy until consumed).

    cases (archive/source.py: waves -> probe -> grouper)
      -> plan       case row + chunk rows, grouped in load units (a block each)   tasks
      -> load       decode, window: one slice row per image   CPU tasks, one per load unit
      -> (blocks of resources.block_rows slice rows)
      -> saliency   BiomedCLIP + M2IB, then boxes / points    actor pool (GPUs when the cluster has them)
      -> masking    SAM                                       actor pool
      (on CPU by default one actor pool runs both, `Together`: resources.models_together)
      -> parts      slice results into staging parts          CPU tasks
                    (a case wholly in the block: assembled here)
    out: one small row per (block, case) and the case rows, for the driver to count and assemble, and
    per block the rows of the cases assembled in it.

Blocks: the grouper hands on the cases of a scan wave as one block (up to thousands of objects). Ray
Data runs one task per block, so planning cuts the wave into load units of at most unit_rows() rows
(2D images together, a DICOM series at chunk boundaries, a volume decoded whole in one unit), each in a
block of its own: a wave is decoded by as many tasks as the cluster's CPUs allow, not by one. Decoding
yields a chunk of slices at a time, and a streaming repartition cuts the decoded slices into blocks of
resources.block_rows rows (a 600-slice series moves as many blocks, not one), so every stage runs as
many tasks or actors as its resources allow and the stages overlap. Every stage's function lives in
mcs_batch.stages; this module wires them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcs_batch.cluster import rechunk
from mcs_batch.config import JobConfig
from mcs_batch.io.storage import StorageOptions
from mcs_batch.pipeline.resources import Pool, Resolved
from mcs_batch.stages.assemble import write_parts
from mcs_batch.stages.load import load_units, plan_units

MIN_UNIT_ROWS = 32  # a decoding task's least work: the task's own cost, and the driver's, stay small beside it


def unit_rows(r: Resolved) -> int:
    """Rows a load unit decodes into (a decoding task's work): a block's worth (resources.block_rows),
    at least MIN_UNIT_ROWS. Every task and block costs the driver ms of CPU (Ray Data's bookkeeping)."""
    return max(r.block_rows, MIN_UNIT_ROWS)


class SaliencyStage:
    """The M2IB actor (mcs_batch.stages.saliency.SaliencyStage), imported in the actor: the driver
    that builds the graph never imports torch or the models."""

    def __init__(self, **kwargs):
        from mcs_batch.stages.saliency import SaliencyStage as Stage

        self.stage = Stage(**kwargs)

    def __call__(self, batch: dict) -> dict:
        return self.stage(batch)


class SamStage:
    """The SAM actor (mcs_batch.stages.masking.SamStage), imported in the actor (see SaliencyStage)."""

    def __init__(self, **kwargs):
        from mcs_batch.stages.masking import SamStage as Stage

        self.stage = Stage(**kwargs)

    def __call__(self, batch: dict) -> dict:
        return self.stage(batch)


class Together:
    """One actor with both model stages (resources.models_together): `first` then `then` on each
    batch, each constructed once with the same arguments."""

    def __init__(self, first: type, then: type, **kwargs):
        self.first, self.then = first(**kwargs), then(**kwargs)

    def __call__(self, batch: dict) -> dict:
        return self.then(self.first(batch))


@dataclass(frozen=True)
class ModelStages:
    """The model actor classes; benchmarks may pass stand-ins (the job always uses the real ones)."""

    saliency: type = SaliencyStage
    masking: type = SamStage


def _model_stage(rows, stage: type, pool: Pool, cfg: JobConfig, storage, board: str | None, **kwargs):
    """An actor pool that loads its model once per actor; a crashed actor is restarted and its batch
    retried (Ray Data's defaults for actor pools: max_restarts and max_task_retries -1), so no case is
    lost or duplicated. kwargs: more constructor arguments."""
    import ray

    arguments = {"cfg": cfg, "storage": storage, "threads": pool.torch_threads, "board": board, **kwargs}
    return rows.map_batches(
        stage,
        fn_constructor_kwargs=arguments,
        batch_size=pool.batch,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.cpus,
        num_gpus=pool.gpus,
    )


def build_pipeline(
    cases,
    cfg: JobConfig,
    resources: Resolved,
    *,
    storage: StorageOptions | None,
    staging_uri: str,
    run_id: str = "",
    board: str | None = None,
    stages: ModelStages | None = None,
):
    """The graph from case rows (archive stream) to part rows."""
    r, stages = resources, stages or ModelStages()
    # Planning asks half a decoding task's CPUs: it is light, and a request that differs keeps Ray Data
    # from fusing the decoding into the planning task (which would make it one task per wave again).
    plan_cpus = r.load_cpus / 2
    units = cases.map_batches(plan_units, fn_kwargs={"cfg": cfg, "unit_rows": unit_rows(r)}, batch_size=None,
                              batch_format="pyarrow", num_cpus=plan_cpus)  # fmt: skip
    units = rechunk(units, 1, num_cpus=plan_cpus)  # a load unit per block: a decoding task each
    rows = units.map_batches(load_units, fn_kwargs={"cfg": cfg, "storage": storage}, batch_size=None,
                             batch_format="pyarrow", num_cpus=r.load_cpus)  # fmt: skip
    rows = rechunk(rows, r.block_rows, num_cpus=r.load_cpus)
    if r.together:
        rows = _model_stage(rows, Together, r.models, cfg, storage, board, first=stages.saliency, then=stages.masking)
    else:
        rows = _model_stage(rows, stages.saliency, r.saliency, cfg, storage, board)  # maps, then prompts
        rows = _model_stage(rows, stages.masking, r.sam, cfg, storage, board)
    return rows.map_batches(
        write_parts,  # with cfg and run_id, whole cases in a block are assembled in the task
        fn_kwargs={
            "staging_uri": staging_uri,
            "storage": storage,
            "n_targets": len(cfg.targets),
            "cfg": cfg,
            "run_id": run_id,
        },
        batch_size=None,
        num_cpus=r.parts_cpus,
    )
