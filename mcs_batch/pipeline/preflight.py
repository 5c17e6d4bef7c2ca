"""What every run of the job does before it starts, with one driver or as shard drivers (shards.py):
the package versions it records, the clean-up after dead runs, the configuration check."""

from __future__ import annotations

from importlib import metadata

from mcs_batch.config import JobConfig
from mcs_batch.errors import ConfigError
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.lease import sweep

PACKAGES = ("mcs-batch", "ray", "torch", "open_clip_torch", "segment-anything", "pydicom", "nibabel", "pyarrow")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_configuration(catalog: Catalog, cfg: JobConfig) -> str:
    """The config hash, or ConfigError (one line) when OUT holds results of another configuration."""
    config_hash = cfg.hash()
    other = catalog.config_hashes() - {config_hash}
    if other:
        raise ConfigError(
            f"{cfg.outputs.uri} holds results of another configuration ({', '.join(sorted(other))}; this one is "
            f"{config_hash}): write to a new output folder"
        )
    return config_hash


def clean_up_dead_runs(catalog: Catalog, cfg: JobConfig, run_id: str, progress) -> None:
    cleaned = sweep(catalog, live=run_id, ttl_s=cfg.outputs.heartbeat_ttl_seconds)
    if cleaned:
        progress(f"cleaned up after {len(cleaned)} thing(s) dead runs left: {'; '.join(cleaned[:3])}")
