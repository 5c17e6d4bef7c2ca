"""Connecting to Ray: a running cluster when an address is given, else a local instance."""

from __future__ import annotations

import logging


def start_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int | None = None):
    """ray.init() once per process. The caller (the CLI) decides the address; the library never
    reads RAY_ADDRESS itself."""
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return ray
