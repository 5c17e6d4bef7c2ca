"""The trained checkpoint ensemble as a predictor: the members' foreground probabilities of 2D images
(2d ensembles) or of whole volumes in physical units (3d_fullres ensembles).

nnU-Net's own pieces do the work (its preprocessor, network builder, sliding-window inference and the
resampling back to the input size); the ensemble's weights are loaded here as plain state dicts with
`torch.load(weights_only=True)` after their sha256 is checked against WORK/ensemble/ensemble.json,
never through nnU-Net's pickle-based checkpoint loader.

Memory does not grow with the member count: the predictor holds one network and, while it predicts,
one member's weights (memory-mapped from a node-local file). Members on object storage are copied to
a node-local folder once (hashed while they stream); local members are used where they are. A member
file that changes after it was checked (size, mtime or inode) is refused, not loaded.
Images are taken a chunk at a time, members in the outer loop (each member loaded once per chunk), and
each slice keeps only the running moments of its members' maps (uncertainty.SliceMoments).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, join
from mcs_batch.train.weak.files import exists, read_bytes
from mcs_batch.train.weak.uncertainty import SliceMoments

ENSEMBLE_FILE = "ensemble.json"
_CHUNK = 8 * 2**20  # bytes per read while a member is hashed or copied


def read_ensemble(work: str, storage: StorageOptions | None) -> dict:
    uri = join(work, "ensemble", ENSEMBLE_FILE)
    if not exists(uri, storage):
        raise ConfigError(f"{uri}: no trained ensemble there (run `mcs-batch train-weak` first)")
    return json.loads(read_bytes(uri, storage))


class EnsemblePredictor:
    """Foreground probabilities of each ensemble member for RGB images (nnU-Net 2d, fold all), or for
    volumes (3d_fullres: `volume_moments`).

    scratch_dir: where members on object storage are copied (default: the system temp folder); the
    copy is removed with the predictor.
    """

    def __init__(self, work: str, *, storage: StorageOptions | None, max_members: int = 0, device: str = "cpu",
                 scratch_dir: str = ""):  # fmt: skip
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
        self._copies = Path(tempfile.mkdtemp(prefix="mcs-weak-members-", dir=scratch_dir or None))
        weakref.finalize(self, shutil.rmtree, str(self._copies), True)
        self.members = [_checked_member(work, m, storage, self._copies) for m in members]
        self.device = torch.device(device)
        self.predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
            device=self.device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
        )  # fmt: skip
        self.predictor.manual_initialization(
            network, self.plans_manager, self.configuration, [], self.dataset_json,
            self.document["trainer"], tuple(self.document.get("mirroring_axes") or ()),
        )  # fmt: skip
        self.network = network.to(self.device)

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def three_d(self) -> bool:
        """Whether the ensemble was trained on whole volumes (nnU-Net's 3d_fullres)."""
        return self.document["configuration"] == "3d_fullres"

    def volume_moments(self, volume_ijk: np.ndarray, spacing_ijk: Sequence[float]) -> SliceMoments:
        """volume_ijk: float32 [I, J, K] in physical units, as export3d wrote it (display orientation),
        spacing_ijk its voxel size in mm -> the running moments of the members' foreground
        probabilities, float32 [I, J, K] maps in [0, 1]. Read as nnU-Net's NibabelIO reads the exported
        NIfTI ([c, K, J, I], spacing reversed), so training and prediction see the same array."""
        if not self.three_d:
            raise ConfigError("volume_moments: this ensemble is 2d (refine it slice by slice)")
        data = np.asarray(volume_ijk, np.float32).transpose(2, 1, 0)[None]
        case = self._run_preprocessor(data, {"spacing": [float(s) for s in spacing_ijk][::-1]})
        out = SliceMoments()
        for _, _, probability in self._maps([case]):
            out.add(probability.transpose(2, 1, 0))
        return out

    def moments(self, images_rgb: Sequence[np.ndarray]) -> list[SliceMoments]:
        """images_rgb: uint8 [H, W, 3] each -> per image the running moments of its members' foreground
        probabilities (float32 [H, W] maps in [0, 1]); each member is loaded once for all the images."""
        out = [SliceMoments() for _ in images_rgb]
        for _, i, probability in self._member_maps(images_rgb):
            out[i].add(probability)
        return out

    def probabilities(self, image_rgb: np.ndarray) -> np.ndarray:
        """image_rgb: uint8 [H, W, 3] (the plane the job segmented) -> float32 [M, H, W] in [0, 1].
        Holds all M maps of the image: `moments` is what refinement uses."""
        maps = [probability for _, _, probability in self._member_maps([image_rgb])]
        return np.stack(maps)

    def _member_maps(self, images_rgb: Sequence[np.ndarray]) -> Iterator[tuple[int, int, np.ndarray]]:
        """(member index, image index, float32 [H, W] probability), members in the outer loop."""
        for m, i, probability in self._maps([self._preprocess(image) for image in images_rgb]):
            yield m, i, probability[0]

    def _maps(self, cases: list) -> Iterator[tuple[int, int, np.ndarray]]:
        """(member index, case index, float32 [Z, Y, X] probability; Z = 1 for 2d), members outside."""
        for m, member in enumerate(self.members):
            weights = member.load()
            self.network.load_state_dict(weights)
            del weights  # the network holds its own copy; the mapping goes
            for i, (tensor, properties) in enumerate(cases):
                yield m, i, self.foreground(tensor, properties)

    def foreground(self, tensor, properties) -> np.ndarray:
        """The loaded network's foreground probability of one preprocessed case: float32 [Z, Y, X] in
        nnU-Net's axis order (Z = 1 for a 2D image)."""
        import torch
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        with torch.no_grad():
            logits = self.predictor.predict_sliding_window_return_logits(tensor).float().cpu()
        _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration, self.label_manager, properties,
            return_probabilities=True, num_threads_torch=1,
        )  # fmt: skip
        return np.asarray(probs[1], np.float32)

    def _preprocess(self, image_rgb: np.ndarray):
        data = np.asarray(image_rgb).transpose(2, 0, 1)[:, None].astype(np.float32)  # as NaturalImage2DIO reads
        return self._run_preprocessor(data, {"spacing": (999, 1, 1)})

    def _run_preprocessor(self, data: np.ndarray, properties: dict):
        """nnU-Net's own preprocessing (crop, normalisation per channel name, resampling to the plan's
        spacing) of data float32 [C, Z, Y, X] -> (tensor, properties for the way back)."""
        import torch

        preprocessor = self.configuration.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(
            data, None, properties, self.plans_manager, self.configuration, self.dataset_json
        )
        return torch.from_numpy(np.ascontiguousarray(data)), properties


class _Member:
    """A member's state dict in a node-local file whose sha256 matched ensemble.json."""

    def __init__(self, name: str, path: Path, identity: tuple[int, int, int]):
        self.name, self.path, self._stat = name, path, identity

    def load(self) -> dict:
        import torch

        if _identity(self.path) != self._stat:
            raise ConfigError(f"ensemble member {self.name}: {self.path} changed after its sha256 was checked")
        return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)


def _checked_member(work: str, member: dict, storage: StorageOptions | None, copies: Path) -> _Member:
    fs, path = filesystem_for(join(work, "ensemble", member["file"]), storage)
    digest = hashlib.sha256()
    if isinstance(fs, LocalFileSystem):
        local = Path(path)
        before = _identity(local)
        with open(local, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
    else:
        local = copies / member["file"]
        with fs.open(path, "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        before = _identity(local)
    if _identity(local) != before:
        raise ConfigError(f"ensemble member {member['file']}: {local} changed while its sha256 was computed")
    if digest.hexdigest() != member["sha256"]:
        raise ConfigError(f"ensemble member {member['file']}: sha256 differs from {ENSEMBLE_FILE}")
    return _Member(member["file"], local, before)


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino
