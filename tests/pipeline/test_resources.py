"""`resources: auto` follows the cluster; explicit values override."""

from __future__ import annotations

from mcs_batch.config import load_config
from mcs_batch.pipeline.resources import GPU_SHARE, resolve

CPU_NODE = {"cpus": 2.0, "gpus": 0.0, "memory": 16e9, "nodes": 1, "gpu_nodes": 0}
GPU_CLUSTER = {"cpus": 96.0, "gpus": 8.0, "memory": 700e9, "nodes": 3, "gpu_nodes": 2}


def test_gpu_clusters_get_one_m2ib_and_one_sam_actor_per_gpu():
    r = resolve(load_config().resources, GPU_CLUSTER)
    assert r.gpus == 8
    for pool in (r.saliency, r.sam):
        assert pool.min_actors == pool.max_actors == 8 and pool.gpus == GPU_SHARE == 0.5
    assert (r.saliency.batch, r.sam.batch, r.sam.torch_threads, r.block_rows) == (32, 8, 4, 256)


def test_gpus_still_to_come_make_the_pools_grow():
    """An autoscaling cluster with its GPU workers at zero: resources.gpus says how many may come."""
    r = resolve(load_config(overrides=["resources.gpus=4"]).resources, {**CPU_NODE, "cpus": 4.0})
    for pool in (r.saliency, r.sam):
        assert (pool.min_actors, pool.max_actors, pool.gpus) == (1, 4, 0.5)
    some = resolve(load_config(overrides=["resources.gpus=8"]).resources, {**GPU_CLUSTER, "gpus": 2.0})
    assert (some.sam.min_actors, some.sam.max_actors) == (2, 8)


def test_cpu_clusters_grow_the_model_pool_from_one_actor_to_one_per_cpu():
    r = resolve(load_config().resources, CPU_NODE)
    assert r.gpus == 0 and (r.saliency.min_actors, r.saliency.max_actors) == (1, 1)
    # one pool with both models (together): one actor at the start, one per CPU with a backlog
    assert (r.sam.min_actors, r.sam.max_actors, r.sam.gpus, r.sam.batch, r.sam.torch_threads) == (1, 2, 0.0, 1, 1)
    assert r.block_rows == 8
    big = resolve(load_config().resources, {**CPU_NODE, "cpus": 32.0, "memory": 40e9})
    assert (big.saliency.min_actors, big.saliency.max_actors) == (1, 16)
    assert big.sam.max_actors == 6  # memory-bound: 40 GB / 5.5 GiB per actor with both models
    two_pools = resolve(load_config(overrides=["resources.models_together=false"]).resources,
                        {**CPU_NODE, "cpus": 32.0, "memory": 40e9})  # fmt: skip
    assert two_pools.sam.min_actors == two_pools.sam.max_actors == 9  # 40 GB / 4 GiB per SAM actor, from the start


def test_one_pool_runs_both_models_on_cpu_two_with_gpus():
    cpu = resolve(load_config().resources, CPU_NODE)
    assert cpu.together and cpu.models == cpu.sam  # the SAM pool's actors; batch min(8, 1) = 1
    assert cpu.to_dict()["models"] == {"min_actors": 1, "max_actors": 2, "cpus": 0.5, "gpus": 0.0, "batch": 1,
                                       "torch_threads": 1}  # fmt: skip
    gpu = resolve(load_config().resources, GPU_CLUSTER)
    assert not gpu.together and gpu.to_dict()["models"] is None
    both = resolve(load_config(overrides=["resources.models_together=true"]).resources, GPU_CLUSTER)
    # two actors per GPU, as with two pools, each holding both models; SAM's GPU batch
    assert both.together and (both.models.max_actors, both.models.gpus, both.models.batch) == (16, 0.5, 8)
    two = resolve(load_config(overrides=["resources.models_together=false"]).resources, CPU_NODE)
    assert not two.together and (two.saliency.max_actors, two.sam.max_actors) == (1, 2)


def test_explicit_values_override():
    cfg = load_config(overrides=["resources.gpus=0", "resources.sam_actors=3", "resources.saliency_batch=2",
                                 "resources.block_rows=5"])  # fmt: skip
    r = resolve(cfg.resources, GPU_CLUSTER)
    assert r.gpus == 0 and (r.sam.min_actors, r.sam.max_actors) == (3, 3) and r.saliency.batch == 2
    assert r.block_rows == 5
    half = resolve(load_config(overrides=["resources.sam_gpus=1"]).resources, GPU_CLUSTER)
    assert half.sam.gpus == 1.0 and half.saliency.gpus == 0.5
    assert load_config(overrides=["resources.gpus=2"]).resources.gpus == 2.0
