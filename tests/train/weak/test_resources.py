"""Devices and process counts of train-weak and refine, resolved from given cluster views."""

from __future__ import annotations

import pytest

from mcs_batch.errors import ConfigError
from mcs_batch.train.weak.config import load_weak_config
from mcs_batch.train.weak.nnunet_env import nnunet_environment
from mcs_batch.train.weak.resources import resolve_weak_resources

LAPTOP = {"cpus": 2.0, "gpus": 0.0, "max_node_cpus": 2.0}
GPU_CLUSTER = {"cpus": 3 * 32.0 + 8.0, "gpus": 12.0, "max_node_cpus": 32.0}  # 3 nodes of 4 GPUs + a head


def resolved(cluster: dict, *overrides: str):
    return resolve_weak_resources(load_weak_config(overrides=list(overrides)), cluster)


def test_cpu_only_cluster_refines_on_cpu_and_plans_with_its_cpus():
    r = resolved(LAPTOP)
    assert (r.refine_device, r.refine_gpus_per_actor, r.refine_actors) == ("cpu", 0.0, 1)
    assert r.plan_processes == 2  # -np / -npfp and the planning task's CPUs
    assert r.augmentation_processes == 0  # one CPU per worker: augmentation stays in the loop
    assert r.to_dict()["cluster"] == LAPTOP


def test_gpu_cluster_puts_one_refine_actor_on_each_gpu_and_feeds_training_from_the_workers_cpus():
    r = resolved(GPU_CLUSTER, "run.cpus_per_worker=8")
    assert (r.refine_device, r.refine_gpus_per_actor, r.refine_actors) == ("cuda", 1.0, 12)
    assert r.plan_processes == 8  # nnU-Net's own default, below the largest node's 32 CPUs
    assert r.augmentation_processes == 7  # nnUNet_n_proc_DA: the worker's CPUs less the training loop
    assert nnunet_environment("/s", stage="train", n_proc_da=r.augmentation_processes)["nnUNet_n_proc_DA"] == "7"
    assert resolved(GPU_CLUSTER, "run.cpus_per_worker=1.5").augmentation_processes == 0
    halves = resolved(GPU_CLUSTER, "refine.gpus_per_actor=0.5")
    assert (halves.refine_device, halves.refine_actors) == ("cuda", 24)


def test_gpus_asked_for_before_the_autoscaler_brought_them_and_explicit_values_win():
    r = resolved(LAPTOP, "run.use_gpu=true")
    assert (r.refine_device, r.refine_actors) == ("cuda", 1)
    r = resolved(GPU_CLUSTER, "refine.gpus_per_actor=0", "refine.actors=3", "run.plan_processes=2",
                 "run.augmentation_processes=0")  # fmt: skip
    assert (r.refine_device, r.refine_actors, r.plan_processes, r.augmentation_processes) == ("cpu", 3, 2, 0)
    assert resolved({"cpus": 1.0, "gpus": 0.0, "max_node_cpus": 0.5}).plan_processes == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [("refine.actors=0", "refine.actors"), ("run.plan_processes=0", "run.plan_processes"),
     ("run.augmentation_processes=-1", "run.augmentation_processes"),
     ("refine.gpus_per_actor=-1", "refine.gpus_per_actor"), ("refine.actors=many", "refine.actors"),
     ("run.transfer_connections=0", "run.transfer_connections"),
     ("run.transfer_connections=auto", "run.transfer_connections")],
)  # fmt: skip
def test_bad_values_are_refused(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_weak_config(overrides=[override])
