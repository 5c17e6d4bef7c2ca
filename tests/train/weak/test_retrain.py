"""Retraining follows the catalog: new or changed pseudo-labels start a new training (a new identity,
export and checkpoints), the same labels reuse the last one; the record and the trigger say which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcs_batch.outputs.catalog import REPLACES, Catalog
from mcs_batch.train.weak.config import load_weak_config
from mcs_batch.train.weak.identity import label_key
from mcs_batch.train.weak.synthetic import write_pseudo_run
from mcs_batch.train.weak.train import train_weak
from mcs_batch.train.weak.trigger import planned_training

QUIET = {"progress": lambda message: None}
TINY = [  # 1 cycle of 2 epochs, the last kept (one member checkpoint); 1 iteration each; 4..64 features
    "train.cycles=1", "train.epochs_per_cycle=2", "train.keep_per_cycle=1", "train.iterations_per_epoch=1",
    "train.val_iterations_per_epoch=1", "train.base_features=4", "run.num_workers=1", "run.cpus_per_worker=0.5",
]  # fmt: skip
TRAINED = ("nnUNet_raw", "mapping", "nnUNet_preprocessed", "checkpoints", "ensemble")


def written(work: Path) -> dict[str, int]:
    """Every file of the export, preprocessing, checkpoints and ensemble -> its modification time (ns)."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns
            for folder in TRAINED for p in (work / folder).rglob("*") if p.is_file()}  # fmt: skip


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow  # two trainings: 319 s on 2 shared cores under load (the other test: one training)
@pytest.mark.usefixtures("ray_local")
def test_cases_added_to_the_catalog_start_a_new_training_and_the_same_labels_reuse_it(tmp_path: Path):
    out, work = tmp_path / "out", tmp_path / "work"
    write_pseudo_run(tmp_path, str(out), n=4)
    cfg = load_weak_config(source=str(out), target="lesion", work=str(work), overrides=TINY)

    first = train_weak(cfg, **QUIET)
    assert first["decision"]["decision"] == "new training: 4 labels (4 new, 0 changed, 0 removed)"
    assert first["decision"]["reused"] is False and first["identity"] == first["decision"]["identity"]
    assert read(work / "training.json")["identity"] == first["identity"]
    assert read(work / "ensemble" / "ensemble.json")["identity"] == first["identity"]
    selection = read(work / "selection.json")
    assert selection["identity"] == first["identity"] and selection["export"]["images"] == 4
    assert list(selection["labels"]) == sorted(selection["labels"])  # sorted by case id: a stable digest
    before = written(work)
    assert [f for f in before if f.startswith("ensemble/member")] == ["ensemble/member00_cycle00_epoch0001.pt"]

    said: list[str] = []  # the same config, nothing new in the catalog
    again = train_weak(cfg, progress=said.append)
    reused = f"reusing training {first['identity']}: labels unchanged"
    assert again["decision"]["decision"] == reused and again["decision"]["reused"] is True
    assert said[1:] == [reused, f"reusing the selection and export in {work} (4 images)",
                        f"run train-weak under {work} is already trained (1 checkpoints)"]  # fmt: skip
    assert written(work) == before  # no new export, preprocessing, checkpoint or ensemble member
    assert read(work / "training.json")["decision"] == reused
    assert planned_training(str(out), "lesion", str(work), overrides=TINY)["decision"] == reused  # the trigger

    # a nightly cohort: 3 more cases committed by another run
    write_pseudo_run(tmp_path, str(out), n=3, seed=1, folder="nightly", run_id="run-nightly")
    expected = f"new training: 7 labels (3 new, 0 changed, 0 removed since {first['identity']})"
    assert planned_training(str(out), "lesion", str(work), overrides=TINY)["decision"] == expected
    second = train_weak(cfg, **QUIET)
    assert second["decision"]["decision"] == expected and second["identity"] != first["identity"]
    assert second["decision"]["labels"] == {"total": 7, "new": 3, "changed": 0, "removed": 0,
                                            "since": first["identity"]}  # fmt: skip
    assert second["config_hash"] == first["config_hash"]  # the same configuration, other labels
    selection = read(work / "selection.json")
    assert selection["export"]["images"] == 7 and selection["identity"] == second["identity"]
    after = written(work)
    member = "ensemble/member00_cycle00_epoch0001.pt"
    assert after[member] > before[member]  # trained again: a new checkpoint under the new identity
    state = read(next((work / "checkpoints" / "train-weak").glob("checkpoint_*/member_00/state.json")))
    assert state["epoch"] == 2 and state["config_hash"] == second["config_hash"]
    assert read(work / "ensemble" / "ensemble.json")["identity"] == second["identity"]
    assert read(work / "training.json")["labels"]["new"] == 3


@pytest.mark.usefixtures("ray_local")
def test_a_case_segmented_again_by_a_newer_run_is_a_changed_label(tmp_path: Path):
    out, work = tmp_path / "out", tmp_path / "work"
    write_pseudo_run(tmp_path, str(out), n=4)
    cfg = load_weak_config(source=str(out), target="lesion", work=str(work), overrides=TINY)
    first = train_weak(cfg, **QUIET)

    catalog = Catalog(str(out))  # case 0 redone by run-redo: its row replaced, the mask at the same path
    row = sorted(catalog.cases().to_pylist(), key=lambda r: r["case_id"])[0]
    slices = [s for s in catalog.slices().to_pylist() if s["case_id"] == row["case_id"]]
    redone = {**row, "run_id": "run-redo", "committed_at": "2025-01-02T00:00:00+00:00", REPLACES: row["run_id"]}
    catalog.commit("run-redo", 0, [redone], [{**s, "run_id": "run-redo"} for s in slices])
    (now,) = [r for r in Catalog(str(out)).cases().to_pylist() if r["case_id"] == row["case_id"]]
    assert now["run_id"] == "run-redo" and now["mask_uri"] == row["mask_uri"] and label_key(now) != label_key(row)

    expected = f"new training: 4 labels (0 new, 1 changed, 0 removed since {first['identity']})"
    planned = planned_training(str(out), "lesion", str(work), overrides=TINY)  # what train-weak will do
    assert planned["decision"] == expected and planned["reused"] is False
    assert planned["identity"] != first["identity"] and planned["config_hash"] == first["config_hash"]
    assert planned["labels"] == {"total": 4, "new": 0, "changed": 1, "removed": 0, "since": first["identity"]}
