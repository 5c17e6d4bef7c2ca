"""A training's identity: its configuration and the pseudo-labels the catalog holds for it now.

    plan = plan_training(cfg, storage=storage)   # the case-level selection, read from the catalog
    plan.identity   # sha256 (16 hex) of cfg.hash() and the digest of the selected labels
    plan.line       # "new training: 14 labels (10 new, 0 changed, 0 removed since 3f2a...)"
                    # or "reusing training 3f2a...: labels unchanged"

A label is a selected catalog row: (case_id, target) and what says which mask it is (mask_uri, the run
that committed it, when, and its voxel count): a case a newer run re-segmented (its row replaced) is a
changed label even where the mask's path is the same. The selection is sorted by case id, so the
digest depends only on the labels. WORK/selection.json keeps each label's key, so the next run can say
what changed since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.train.weak.config import WeakConfig
from mcs_batch.train.weak.files import exists, read_bytes
from mcs_batch.train.weak.select import Selection, select_from_catalog

SELECTION_FILE = "selection.json"
LABEL_FIELDS = ("case_id", "target", "mask_uri", "run_id", "committed_at", "mask_voxels")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def label_key(row: dict) -> str:
    """sha256 (16 hex) of the fields that say which pseudo-label a catalog row is."""
    return _digest([row.get(k) for k in LABEL_FIELDS])


def labels_of(selection: Selection) -> dict[str, str]:
    """case id -> label key of every selected case, sorted by case id."""
    return {row["case_id"]: label_key(row) for row in sorted(selection.cases, key=lambda r: r["case_id"])}


def training_identity(config_hash: str, labels: dict[str, str]) -> str:
    """sha256 (16 hex) of the configuration hash and the labels: the same for the same training."""
    return _digest({"config_hash": config_hash, "labels": sorted(labels.items())})


@dataclass(frozen=True)
class LabelChanges:
    """The labels now against those of the previous training under the same WORK."""

    total: int
    new: int
    changed: int
    removed: int
    since: str | None  # the previous training's identity (None: none recorded)

    @classmethod
    def between(cls, labels: dict[str, str], previous: dict | None) -> LabelChanges:
        before: dict[str, str] = (previous or {}).get("labels") or {}
        new = sum(1 for c in labels if c not in before)
        changed = sum(1 for c, key in labels.items() if c in before and before[c] != key)
        removed = sum(1 for c in before if c not in labels)
        return cls(len(labels), new, changed, removed, (previous or {}).get("identity"))

    def to_dict(self) -> dict:
        return {"total": self.total, "new": self.new, "changed": self.changed, "removed": self.removed,
                "since": self.since}  # fmt: skip


@dataclass(frozen=True)
class TrainingPlan:
    """What train-weak does with the catalog as it is: a new training, or the last one again."""

    config_hash: str
    identity: str
    labels: dict[str, str]  # case id -> label key
    selection: Selection
    previous: dict | None  # WORK/selection.json of the last training (None: none yet)
    changes: LabelChanges

    @property
    def reuse(self) -> bool:
        return self.previous is not None and self.previous.get("identity") == self.identity

    @property
    def line(self) -> str:
        if self.reuse:
            return f"reusing training {self.identity}: labels unchanged"
        c = self.changes
        since = f" since {c.since}" if c.since else ""
        return f"new training: {c.total} labels ({c.new} new, {c.changed} changed, {c.removed} removed{since})"

    def record(self) -> dict:
        """The decision as the training record and the job's run record keep it."""
        return {"identity": self.identity, "config_hash": self.config_hash, "reused": self.reuse,
                "decision": self.line, "labels": self.changes.to_dict()}  # fmt: skip


def read_selection(cfg: WeakConfig, storage: StorageOptions | None) -> dict | None:
    """WORK/selection.json (the last training's selection, export and labels), None when absent."""
    uri = join(cfg.work, SELECTION_FILE)
    return json.loads(read_bytes(uri, storage)) if exists(uri, storage) else None


def plan_training(cfg: WeakConfig, *, storage: StorageOptions | None = None) -> TrainingPlan:
    """The case-level selection from the catalog (no Ray, no image read), its identity, and how its
    labels differ from the last training's (WORK/selection.json)."""
    selection = select_from_catalog(Catalog(cfg.source, storage=storage), cfg.target, cfg.select, storage=storage)
    labels = labels_of(selection)
    config_hash = cfg.hash()
    previous = read_selection(cfg, storage)
    return TrainingPlan(config_hash, training_identity(config_hash, labels), labels, selection, previous,
                        LabelChanges.between(labels, previous))  # fmt: skip
