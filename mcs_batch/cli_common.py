"""What every `mcs-batch` command shares: exit codes, storage and Ray flags, progress lines.

The command modules (mcs_batch.cli, eval/cli.py, train/cli.py) import this; it imports nothing of
theirs. Like them it is allowed to read argv-derived namespaces and the environment.
"""

from __future__ import annotations

import argparse
import os
import sys

from mcs_batch.io.dicomweb import DicomWebAuth, auth_from_file
from mcs_batch.io.storage import StorageOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries the command's result)."""
    print(f"mcs-batch: {message}", file=sys.stderr, flush=True)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Storage and local-Ray flags of every command that reads or writes archives."""
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL[_S3] or AWS)")
    p.add_argument("--profile", help="AWS profile for s3:// inputs and outputs")
    p.add_argument("--anon", action="store_true", help="anonymous access to public buckets")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (ignored with RAY_ADDRESS)")
    p.add_argument("--object-store-mb", type=int, default=None, help="object store size for a local Ray")
    p.add_argument("--verbose", action="store_true", help="also Ray Data's own per-operator progress logs")


def storage_options(args: argparse.Namespace) -> StorageOptions:
    """Endpoint and profile from flags or the standard AWS variables; keys only from the
    environment / profile chain (never from flags, so they stay out of shell history and logs)."""
    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return StorageOptions(endpoint_url=endpoint, profile=args.profile, anon=args.anon, dicomweb=dicomweb_auth())


def dicomweb_auth() -> DicomWebAuth | None:
    """Credentials of dicomweb(s):// servers, from the environment only (never flags or the job file):
    DICOMWEB_TOKEN (a bearer token), else DICOMWEB_USER and DICOMWEB_PASSWORD (basic), else the JSON
    file named by DICOMWEB_CREDENTIALS_FILE ({"token": ...} or {"username": ..., "password": ...})."""
    if os.environ.get("DICOMWEB_TOKEN"):
        return DicomWebAuth(token=os.environ["DICOMWEB_TOKEN"])
    if os.environ.get("DICOMWEB_USER"):
        return DicomWebAuth(username=os.environ["DICOMWEB_USER"], password=os.environ.get("DICOMWEB_PASSWORD", ""))
    if os.environ.get("DICOMWEB_CREDENTIALS_FILE"):
        return auth_from_file(os.environ["DICOMWEB_CREDENTIALS_FILE"])
    return None


def start_ray(args: argparse.Namespace):
    """The Ray cluster at RAY_ADDRESS (set inside `ray job submit`), else a local one."""
    from mcs_batch.cluster import start_ray as _start

    return _start(os.environ.get("RAY_ADDRESS"), num_cpus=args.num_cpus, object_store_mb=args.object_store_mb,
                  quiet=not getattr(args, "verbose", False))  # fmt: skip
