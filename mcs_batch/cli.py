"""The `mcs-batch` command line: the only place that reads argv and the environment.

Expected errors (bad arguments, missing inputs, unreachable buckets) print one line and exit 2;
an interrupted run exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _storage_options(args: argparse.Namespace) -> StorageOptions:
    """Endpoint and profile from flags or the standard AWS variables; keys only from the
    environment / profile chain (never from flags, so they stay out of shell history and logs)."""
    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return StorageOptions(endpoint_url=endpoint, profile=args.profile, anon=args.anon)


def _ray(args: argparse.Namespace):
    from mcs_batch.cluster import start_ray

    return start_ray(os.environ.get("RAY_ADDRESS"), num_cpus=args.num_cpus, object_store_mb=args.object_store_mb)


def _progress(message: str) -> None:
    print(f"mcs-batch: {message}", file=sys.stderr, flush=True)


def cmd_scan(args: argparse.Namespace) -> int:
    from mcs_batch.scan import scan

    storage = _storage_options(args)
    _ray(args)
    summary = scan(
        args.inputs, args.out, storage=storage, include=args.include, exclude=args.exclude, progress=_progress
    )
    print("\n".join(summary.lines()))
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from mcs_batch.sample import build_sample_archive

    dest = build_sample_archive(Path(args.dest))
    n = sum(1 for p in dest.rglob("*") if p.is_file())
    print(f"sample archive with {n} files written to {dest}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's first command: build the sample archive and scan it."""
    from mcs_batch.sample import build_sample_archive
    from mcs_batch.scan import scan

    out = Path(args.out)
    archive = build_sample_archive(out / "sample-archive")
    _progress(f"sample archive written to {archive}")
    _ray(args)
    summary = scan([str(archive)], str(out / "scan"), progress=_progress)
    print("\n".join(summary.lines()))
    query = f"import pandas; print(pandas.read_parquet('{out}/scan/manifest'))"
    print(f'\nlook at the manifest with: .venv/bin/python -c "{query}"')
    return EXIT_OK


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL[_S3] or AWS)")
    p.add_argument("--profile", help="AWS profile for s3:// inputs and outputs")
    p.add_argument("--anon", action="store_true", help="anonymous access to public buckets")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (ignored with RAY_ADDRESS)")
    p.add_argument("--object-store-mb", type=int, default=None, help="object store size for a local Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcs-batch",
        description="Text-driven medical image segmentation (MedCLIP-SAMv2) over whole archives, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="discover cases in archives and write the case manifest (no models)")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="paths or URIs (file://, s3://, ...) of files or prefixes"
    )
    p.add_argument("--out", required=True, help="output folder or URI; the manifest goes to OUT/manifest/")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="only keys matching (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip keys matching (repeatable)")
    _add_common(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("sample", help="write the small real sample archive to a folder")
    p.add_argument("dest", help="destination folder (replaced)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="build the sample archive and run the pipeline on it")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mcs-batch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mcs-batch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
