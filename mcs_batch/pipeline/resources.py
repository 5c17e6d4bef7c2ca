"""Resources that follow the cluster: `resources: auto` resolved against what Ray reports at start.

With GPUs (ray.cluster_resources()["GPU"] > 0, or resources.gpus set):
    each GPU holds one M2IB and one SAM actor (GPU_SHARE = half of it each, so that Ray places
    exactly two per GPU); both pools start with one actor per GPU present and grow to one per GPU
    of resources.gpus: on an autoscaling cluster whose GPU workers start at zero (infra/, and
    ray_cluster.yaml), set resources.gpus to the GPUs the job may use, and the pools' pending GPU
    actors make the autoscaler launch the GPU workers. Ray restarts a dead actor (its batches are
    retried on it); a lost node makes the job plan again (pipeline/job.py).
    M2IB batch 32, SAM batch 8, 4 torch threads per actor, blocks of 32 slice rows.
Without GPUs (tests, laptops, smoke runs):
    actors of 0.5 CPU and one torch thread each. The M2IB pool autoscales from 1 to max(1, CPUs // 2)
    actors (Ray Data grows it while it has a backlog); the SAM pool (on CPU by default the one pool,
    `together`) starts with one actor and grows to one per CPU, at most one per SAM_MEMORY of the
    cluster's memory (SAM_MEMORY + CLIP_MEMORY when each actor holds both models). SAM's image
    encoder is the costliest step on a CPU (measured here with tiny models: ~0.5 s per slice against
    ~0.05 s for M2IB; vit_b ~10 s against BiomedCLIP-size M2IB ~3.6 s). With two pools, Ray Data's
    autoscaler grew the SAM pool too late on a 2-CPU node (a second actor after 45 s of a 100 s job),
    so it was held at full size from the start; with the one pool it grows as soon as the first actor
    has a backlog (100 images on 2 CPUs: the second actor started at 10.2 s, job 37.0-37.7 s, against
    37.3 s with both from the start), and a run with nothing to segment starts one model process, not
    one per CPU (an empty run of the test cohort: 12 -> 8 s). M2IB batch 8, SAM batch 1 (batching is
    slower on CPU, see bench/sam_bench.py), blocks of 8 slice rows (with blocks of 32 the 200-image
    stream bench committed its first case at 46% of the job, waiting for a whole block through SAM).
One pool or two (resources.models_together): auto = one pool on CPU, whose actors load both models and
run M2IB and then SAM on each block (the SAM pool's sizes, at the smaller of the two batch sizes):
on a 2-CPU node this starts two model processes instead of three (each start imports torch,
open_clip and segment_anything: ~4.6 s of CPU) and moves no image between the stages. With GPUs two
pools, as above; together there, each GPU holds two actors with both models (GPU_SHARE each).
Explicit values in the config override any of these. The resolved values are recorded in the run
record, with the cluster they were resolved against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from mcs_batch.config import AUTO, ResourcesConfig
from mcs_batch.errors import ConfigError

GPU_SHARE = 0.5  # of a GPU reserved by each model actor when the pools have GPUs
SAM_MEMORY = 4 * 2**30  # bytes of cluster memory per SAM actor on CPU (vit_b peaks at ~3.7 GiB RSS)
# more per actor holding both models: BiomedCLIP's ~196M float32 parameters (0.8 GB) and M2IB's
# activations (an estimate from the parameter count, not a measured peak)
CLIP_MEMORY = 3 * 2**29


@dataclass(frozen=True)
class Pool:
    """One model actor pool (a Ray Data ActorPoolStrategy) and what each actor reserves."""

    min_actors: int
    max_actors: int
    cpus: float
    gpus: float
    batch: int
    torch_threads: int


@dataclass(frozen=True)
class Resolved:
    gpus: float  # GPUs the model pools use (0: CPU only)
    saliency: Pool
    sam: Pool
    together: bool  # one pool (`models`) runs both models; the saliency and sam pools are not started
    block_rows: int
    slice_chunk: int
    load_cpus: float
    parts_cpus: float
    assemble_cpus: float
    cluster: dict  # what Ray reported: cpus, gpus, memory, nodes, gpu_nodes

    @property
    def models(self) -> Pool:
        """The one pool of `together`: the SAM pool's actors and resources, the smaller batch."""
        return replace(self.sam, batch=min(self.saliency.batch, self.sam.batch))

    def to_dict(self) -> dict:
        return {**asdict(self), "models": asdict(self.models) if self.together else None}


def cluster_view() -> dict:
    """CPUs, GPUs and nodes of the running Ray cluster (alive nodes only)."""
    import ray

    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "cpus": float(total.get("CPU", 0.0)),
        "gpus": float(total.get("GPU", 0.0)),
        "memory": float(total.get("memory", 0.0)),
        "nodes": len(nodes),
        "gpu_nodes": sum(1 for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0),
    }


# What `resources.drivers: auto` sizes the shards by: slices per second one GPU takes (an H200 running
# SAM vit_b and BiomedCLIP's M2IB, the estimate; bench/gpu_bench.py measures it where a GPU is
# lent) and slices per second one driver coordinates with a core to spare (bench/driver_bench.py's
# capacity for volumes at GPU blocks, halved: a driver at full load would be the bottleneck).
GPU_SLICES_PER_S = 175.0
# Slice rows per block on GPUs: Ray Data's driver-side work is per block and per operator, so a GPU
# cluster's thousands of slices/s move in large blocks (bench/driver_bench.py: 2D capacity 249 -> 527
# images/s from 32 to 256 rows, volumes 251 -> 645); ~1.5 s of one GPU's work per block.
GPU_BLOCK_ROWS = 256
DRIVER_SLICES_PER_S = 400.0


def drivers_for(res: ResourcesConfig, cluster: dict) -> int:
    """Shard drivers for this cluster: resources.drivers, or auto: enough that no driver coordinates
    more than DRIVER_SLICES_PER_S at GPU_SLICES_PER_S per GPU (1 without GPUs), at most one per GPU."""
    if res.drivers != AUTO:
        return int(res.drivers)
    gpus = float(_pick(res.gpus, cluster.get("gpus", 0.0)))
    if gpus <= 0:
        return 1
    return max(1, min(int(gpus), math.ceil(gpus * GPU_SLICES_PER_S / DRIVER_SLICES_PER_S)))


def _share(total: float, i: int, n: int) -> float:
    """Shard i's share of `total` split N ways: whole units where the total is whole (8 GPUs in 3 shards:
    3, 3, 2, not 2.67 each, which would leave 2 GPUs idle)."""
    if float(total).is_integer():
        return float(math.floor(total * (i + 1) / n) - math.floor(total * i / n))
    return total / n


def shard_view(cluster: dict, shard: tuple[int, int] | None) -> dict:
    """Shard (i, N)'s share of the cluster (its pools are sized by it): CPUs, GPUs and memory split N ways."""
    if shard is None or shard[1] <= 1:
        return dict(cluster)
    i, n = shard
    share = {k: _share(float(cluster.get(k, 0.0)), i, n) for k in ("cpus", "gpus", "memory")}
    return {**cluster, **share, "shard": f"{i + 1}/{n}"}


def _pick(value, default):
    return default if value == AUTO else value


def resolve(res: ResourcesConfig, cluster: dict, shard: tuple[int, int] | None = None) -> Resolved:
    """Concrete pool sizes and per-actor resources for this cluster; a shard driver's (shard = (i, N))
    for its share of it: the cluster, and an explicit resources.gpus, split N ways."""
    cluster = shard_view(cluster, shard)
    present = float(cluster["gpus"])
    gpus = float(_pick(res.gpus, present))
    if shard is not None and shard[1] > 1 and res.gpus != AUTO:
        gpus = _share(gpus, *shard)
    together = gpus == 0 if res.models_together == AUTO else bool(res.models_together)
    if gpus > 0:
        most = max(1, int(gpus))
        least = max(1, min(most, int(present)))  # GPUs still to be launched: the pool grows as they come
        pools = {}
        for name in ("saliency", "sam"):
            explicit = getattr(res, f"{name}_actors")
            pools[name] = Pool(
                min_actors=least if explicit == AUTO else int(explicit),
                max_actors=most if explicit == AUTO else int(explicit),
                cpus=float(getattr(res, f"{name}_cpus")),
                gpus=float(_pick(getattr(res, f"{name}_gpus"), GPU_SHARE)),
                batch=int(_pick(getattr(res, f"{name}_batch"), 32 if name == "saliency" else 8)),
                torch_threads=int(_pick(res.torch_threads, 4)),
            )
    else:
        per_actor = SAM_MEMORY + (CLIP_MEMORY if together else 0)
        sam = max(1, min(int(cluster["cpus"]), int(cluster.get("memory", per_actor) // per_actor)))
        sizes = {"saliency": (1, max(1, int(cluster["cpus"] // 2))), "sam": (1 if together else sam, sam)}
        pools = {}
        for name in ("saliency", "sam"):
            explicit = getattr(res, f"{name}_actors")
            pools[name] = Pool(
                min_actors=sizes[name][0] if explicit == AUTO else int(explicit),
                max_actors=sizes[name][1] if explicit == AUTO else int(explicit),
                cpus=float(getattr(res, f"{name}_cpus")),
                gpus=float(_pick(getattr(res, f"{name}_gpus"), 0.0)),
                batch=int(_pick(getattr(res, f"{name}_batch"), 8 if name == "saliency" else 1)),
                torch_threads=int(_pick(res.torch_threads, 1)),
            )
    if together and gpus > 0 and res.sam_actors == AUTO:  # two actors per GPU, each with both models
        sam = pools["sam"]
        pools["sam"] = replace(sam, min_actors=2 * sam.min_actors, max_actors=2 * sam.max_actors)
    return Resolved(
        gpus=gpus,
        saliency=pools["saliency"],
        sam=pools["sam"],
        together=together,
        block_rows=int(_pick(res.block_rows, GPU_BLOCK_ROWS if gpus > 0 else 8)),
        slice_chunk=res.slice_chunk,
        load_cpus=res.load_cpus,
        parts_cpus=res.parts_cpus,
        assemble_cpus=res.assemble_cpus,
        cluster=dict(cluster),
    )


def await_gpus(asked: float, wait_seconds: float, progress) -> None:
    """GPUs were asked for (resources.gpus) and the cluster has none: ask the autoscaler for one and
    wait up to `wait_seconds` for it; ConfigError (one line, exit 2, before the run record) when none
    comes, instead of model actors waiting for GPUs forever."""
    import time

    import ray

    def request(bundles: list[dict]) -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        except Exception:  # no autoscaler here (a local or fixed cluster): waiting tells the same
            pass

    request([{"GPU": 1}])
    progress(f"resources.gpus={asked:g}: no GPU in the cluster yet; waiting up to {wait_seconds:g} s for one")
    deadline = time.monotonic() + wait_seconds
    try:
        while time.monotonic() < deadline:
            if float(ray.cluster_resources().get("GPU", 0.0)) > 0:
                return
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    finally:
        request([])  # the standing request would keep a GPU node up after the job: the actors ask now
    raise ConfigError(
        f"resources.gpus={asked:g} asks for GPUs, but the cluster has none after {wait_seconds:g} s "
        "(resources.gpu_wait_seconds): run on a GPU cluster, or use resources.gpus=auto or 0 on CPUs"
    )
