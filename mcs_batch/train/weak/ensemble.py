"""The trained checkpoint ensemble as a predictor: probability maps of every member for one 2D image.

nnU-Net's own pieces do the work (its preprocessor, network builder, sliding-window inference and the
resampling back to the input size); the ensemble's weights are loaded here as plain state dicts with
`torch.load(weights_only=True)` after their sha256 is checked against WORK/ensemble/ensemble.json,
never through nnU-Net's pickle-based checkpoint loader.
"""

from __future__ import annotations

import io
import json

import numpy as np

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.train.weak.files import exists, read_bytes, sha256

ENSEMBLE_FILE = "ensemble.json"


def read_ensemble(work: str, storage: StorageOptions | None) -> dict:
    uri = join(work, "ensemble", ENSEMBLE_FILE)
    if not exists(uri, storage):
        raise ConfigError(f"{uri}: no trained ensemble there (run `mcs-batch train-weak` first)")
    return json.loads(read_bytes(uri, storage))


class EnsemblePredictor:
    """Foreground probabilities of each ensemble member for RGB images (nnU-Net 2d, fold all)."""

    def __init__(self, work: str, *, storage: StorageOptions | None, max_members: int = 0, device: str = "cpu"):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.document = read_ensemble(work, storage)
        members = self.document["members"][-max_members:] if max_members else self.document["members"]
        plans = json.loads(read_bytes(self.document["plans"], storage))
        self.dataset_json = json.loads(read_bytes(self.document["dataset_json"], storage))
        self.plans_manager = PlansManager(plans)
        self.configuration = self.plans_manager.get_configuration(self.document["configuration"])
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        channels = determine_num_input_channels(self.plans_manager, self.configuration, self.dataset_json)
        network = nnUNetTrainer.build_network_architecture(
            self.plans_manager, self.configuration, channels, self.label_manager.num_segmentation_heads, False
        )
        self.weights = []
        for member in members:
            data = read_bytes(join(work, "ensemble", member["file"]), storage)
            if sha256(data) != member["sha256"]:
                raise ConfigError(f"ensemble member {member['file']}: sha256 differs from {ENSEMBLE_FILE}")
            self.weights.append(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        self.device = torch.device(device)
        self.predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
            device=self.device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
        )  # fmt: skip
        self.predictor.manual_initialization(
            network, self.plans_manager, self.configuration, self.weights, self.dataset_json,
            self.document["trainer"], tuple(self.document.get("mirroring_axes") or ()),
        )  # fmt: skip
        self.network = network

    @property
    def n_members(self) -> int:
        return len(self.weights)

    def probabilities(self, image_rgb: np.ndarray) -> np.ndarray:
        """image_rgb: uint8 [H, W, 3] (the plane the job segmented) -> float32 [M, H, W] in [0, 1]."""
        import torch
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        data = np.asarray(image_rgb).transpose(2, 0, 1)[:, None].astype(np.float32)  # as NaturalImage2DIO reads
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(
            data, None, {"spacing": (999, 1, 1)}, self.plans_manager, self.configuration, self.dataset_json
        )
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        out = []
        for weights in self.weights:
            self.network.load_state_dict(weights)
            with torch.no_grad():
                logits = self.predictor.predict_sliding_window_return_logits(tensor).float().cpu()
            _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, self.plans_manager, self.configuration, self.label_manager, properties,
                return_probabilities=True, num_threads_torch=1,
            )  # fmt: skip
            out.append(np.asarray(probs[1, 0], np.float32))
        return np.stack(out)
