"""Devices and process counts of train-weak and refine from the cluster (`auto` values resolved once,
at the start of a run, against what Ray reports; explicit config values override).

    planning        nnU-Net's -np / -npfp = run.plan_processes; auto = the CPUs of the largest node, at
                    most 8 (nnU-Net's own default for 2d); its Ray task reserves one CPU (planning runs alone,
                    before training; a task asking for every CPU would wait behind any actor)
    training        nnUNet_n_proc_DA per worker = run.augmentation_processes; auto = the worker's CPUs
                    (run.cpus_per_worker) less one for the training loop itself, 0 (augmentation in the
                    loop, ENVIRONMENT.md) with one CPU or less: a GPU fed by one thread starves
    refine          refine.gpus_per_actor; auto = 1 when the cluster has GPUs (or run.use_gpu asks for
                    them), else 0 (CPU); refine.actors; auto = one per GPU, 1 on CPU

Pure (`resolve_weak_resources(cfg, cluster)`); `weak_cluster_view()` reads the running cluster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mcs_batch.train.weak.config import AUTO, WeakConfig

NNUNET_DEFAULT_PROCESSES = 8  # nnU-Net's -np and -npfp for a 2d configuration


@dataclass(frozen=True)
class WeakResources:
    plan_processes: int  # -np and -npfp of nnU-Net's planning and preprocessing
    augmentation_processes: int  # nnUNet_n_proc_DA in each training worker (0: augmentation in the loop)
    refine_actors: int
    refine_gpus_per_actor: float  # > 0: the refine actors predict on "cuda"
    cluster: dict  # what Ray reported: cpus, gpus, max_node_cpus

    @property
    def refine_device(self) -> str:
        return "cuda" if self.refine_gpus_per_actor > 0 else "cpu"

    def to_dict(self) -> dict:
        return {**asdict(self), "refine_device": self.refine_device}


def weak_cluster_view() -> dict:
    """CPUs and GPUs of the running Ray cluster, and the CPUs of its largest alive node."""
    import ray

    if not ray.is_initialized():
        ray.init()  # as Ray's first remote call would
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "cpus": float(total.get("CPU", 0.0)),
        "gpus": float(total.get("GPU", 0.0)),
        "max_node_cpus": max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes), default=0.0),
    }


def resolve_weak_resources(cfg: WeakConfig, cluster: dict) -> WeakResources:
    """Concrete values for this cluster. cluster: {"cpus", "gpus", "max_node_cpus"} (weak_cluster_view)."""
    run, refine = cfg.run, cfg.refine
    node_cpus = int(cluster.get("max_node_cpus") or cluster.get("cpus") or 1)
    plan = run.plan_processes
    if plan == AUTO:
        plan = max(1, min(NNUNET_DEFAULT_PROCESSES, node_cpus))
    augmentation = run.augmentation_processes
    if augmentation == AUTO:
        augmentation = max(0, int(run.cpus_per_worker) - 1)
    gpus = float(cluster.get("gpus") or 0.0)
    per_actor = refine.gpus_per_actor
    if per_actor == AUTO:
        per_actor = 1.0 if gpus > 0 or run.use_gpu else 0.0
    actors = refine.actors
    if actors == AUTO:
        actors = max(1, int(gpus // per_actor)) if per_actor > 0 else 1
    return WeakResources(plan_processes=int(plan), augmentation_processes=int(augmentation), refine_actors=int(actors),
                         refine_gpus_per_actor=float(per_actor), cluster=dict(cluster))  # fmt: skip
