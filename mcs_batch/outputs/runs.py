"""Run records: what each run writing OUT did, as typed objects (OUT/runs/<run_id>.json).

A segmentation job writes its record when it starts (status "running") and again at its end; a
refinement (train-weak --refine) and a migration write theirs. Readers (evaluate, report, train-weak,
query --as-of) read them through `read_run` / `list_runs`, never the JSON by hand.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

RUNS_DIR = "runs"


@dataclass
class RunRecord:
    """The fields readers rely on; `document` keeps the whole record (resources, actors, timeline...)."""

    run_id: str
    status: str = ""  # running | succeeded | failed | aborted
    started_at: str = ""
    finished_at: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the job's config (config.JobConfig.to_dict)
    config_hash: str = ""
    tiny_models: bool = False
    # table -> {"first": version, "last": version}: the Delta versions this run's commits produced
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    document: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_document(cls, document: dict) -> RunRecord:
        return cls(run_id=str(document.get("run_id") or ""), status=str(document.get("status") or ""),
                   started_at=str(document.get("started_at") or ""), finished_at=str(document.get("finished_at") or ""),
                   config=dict(document.get("config") or {}), config_hash=str(document.get("config_hash") or ""),
                   tiny_models=bool(document.get("tiny_models")), tables=dict(document.get("tables") or {}),
                   document=document)  # fmt: skip

    def job_config(self):
        """The segmentation job's config (config.JobConfig) this run ran with; defaults when the record
        has none (a refinement's record, a record from before configs were kept)."""
        from mcs_batch.config import JobConfig
        from mcs_batch.yaml_config import load

        if not self.config or "targets" not in self.config:
            return JobConfig()
        return load(JobConfig, tree=self.config)

    @property
    def ablation(self) -> str:
        return str(self.config.get("ablation") or "full")

    def version_of(self, table: str) -> int | None:
        """The version of `table` as this run left it (its last commit), or None."""
        versions = self.tables.get(table) or {}
        return versions.get("last")


def read_run(catalog, run_id: str) -> RunRecord | None:
    """The record of one run, or None when OUT has none (or it cannot be parsed)."""
    try:
        data = catalog.fs.cat_file(catalog.path(RUNS_DIR, f"{run_id}.json"))
        return RunRecord.from_document(json.loads(data))
    except (FileNotFoundError, ValueError):
        return None


def list_runs(catalog) -> list[RunRecord]:
    """Every run record of OUT, oldest first (run ids start with their UTC start time)."""
    try:
        paths = sorted(p for p in catalog.fs.ls(catalog.path(RUNS_DIR), detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for path, data in sorted(catalog.fs.cat(paths).items() if paths else ()):  # fetched concurrently on S3
        try:
            out.append(RunRecord.from_document(json.loads(data)))
        except ValueError:
            out.append(RunRecord(run_id=posixpath.basename(path).removesuffix(".json"), status="unreadable"))
    return out
