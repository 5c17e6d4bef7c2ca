"""A checkpoint ensemble of randomly initialised nnU-Net 2d networks, in the format train-weak writes.

For tests and benchmarks of refinement without training first:

    write_random_ensemble("work/", members=30, image_size=512)   # a typical 2d nnU-Net, ~46 M parameters

WORK/nnUNet_preprocessed/<Dataset>/{nnUNetPlans.json, dataset.json} follow what nnU-Net's planner
writes for RGB PNGs of image_size x image_size (NaturalImage2DIO, z-score per channel): patch = image,
stages down to a 4-pixel bottleneck, features base * 2^i capped at max_features, PlainConvUNet.
WORK/ensemble/member<k>.pt are state dicts of that network, each initialised as nnU-Net does (He) with
seed + k, and WORK/ensemble/ensemble.json lists them with their sha256 (train._write_ensemble's format).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DATASET = "Dataset999_random"
CONFIGURATION = "2d"


def random_plans(image_size: int, *, base_features: int = 32, max_features: int = 512) -> dict:
    """nnU-Net plans (2d configuration only) for RGB images of image_size x image_size pixels."""
    stages, size = 1, image_size
    while size % 2 == 0 and size // 2 >= 4:
        stages, size = stages + 1, size // 2
    arch = {
        "n_stages": stages,
        "features_per_stage": [min(base_features * 2**i, max_features) for i in range(stages)],
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * stages,
        "strides": [[1, 1]] + [[2, 2]] * (stages - 1),
        "n_conv_per_stage": [2] * stages,
        "n_conv_per_stage_decoder": [2] * (stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": "nnUNetPlans_2d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 12,
        "patch_size": [image_size, image_size],
        "median_image_size_in_voxels": [float(image_size), float(image_size)],
        "spacing": [1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"] * 3,
        "use_mask_for_norm": [False] * 3,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": arch,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": True,
    }
    intensity = {"max": 255.0, "mean": 120.0, "median": 120.0, "min": 0.0, "percentile_00_5": 5.0,
                 "percentile_99_5": 250.0, "std": 50.0}  # fmt: skip
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, image_size, image_size],
        "image_reader_writer": "NaturalImage2DIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): intensity for c in range(3)},
    }


DATASET_JSON = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "lesion": 1},
                "numTraining": 0, "file_ending": ".png", "name": DATASET}  # fmt: skip


def build_network(plans: dict):
    """The PlainConvUNet of `plans` as nnU-Net builds it for training (initialised, deep supervision off)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    heads = manager.get_label_manager(DATASET_JSON).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(manager, manager.get_configuration(CONFIGURATION), 3, heads, False)


def write_random_ensemble(work: str | Path, *, members: int, image_size: int, base_features: int = 32,
                          max_features: int = 512, seed: int = 0) -> dict:  # fmt: skip
    """Write the ensemble under a local WORK folder; returns its ensemble.json document (plus
    `parameters`, the network's parameter count)."""
    import torch

    work = Path(work)
    plans = random_plans(image_size, base_features=base_features, max_features=max_features)
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans, indent=1))
    (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=1))
    folder = work / "ensemble"
    folder.mkdir(parents=True, exist_ok=True)
    network = build_network(plans)
    parameters = sum(p.numel() for p in network.parameters())
    listed = []
    for k in range(members):
        torch.manual_seed(seed + k)
        network.apply(network.initialize)  # nnU-Net's initialisation (He), as when it builds the network
        name = f"member{k:02d}.pt"
        torch.save({key: t.detach().cpu() for key, t in network.state_dict().items()}, folder / name)
        digest = hashlib.sha256()
        with open(folder / name, "rb") as f:
            while chunk := f.read(8 * 2**20):
                digest.update(chunk)
        listed.append({"file": name, "sha256": digest.hexdigest()})
    document = {
        "format": 1, "config_hash": "random", "dataset": DATASET, "configuration": CONFIGURATION,
        "trainer": "nnUNetTrainer", "plans": str(preprocessed / "nnUNetPlans.json"),
        "dataset_json": str(preprocessed / "dataset.json"), "mirroring_axes": [0, 1], "members": listed,
    }  # fmt: skip
    (folder / "ensemble.json").write_text(json.dumps(document, indent=2))
    return {**document, "parameters": parameters}
