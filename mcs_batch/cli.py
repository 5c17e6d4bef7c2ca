"""The `mcs-batch` command line: the only place that reads argv and the environment.

Expected errors (bad arguments, missing inputs, unreachable buckets) print one line and exit 2;
an interrupted run exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
from pathlib import Path

from mcs_batch.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_common_args,
    progress,
    start_ray,
    storage_options,
)
from mcs_batch.errors import ConfigError
from mcs_batch.eval.cli import add_commands as add_eval_commands
from mcs_batch.io.storage import StorageOptions, join
from mcs_batch.train.cli import add_commands as add_train_commands


def cmd_scan(args: argparse.Namespace) -> int:
    from mcs_batch.scan import scan

    storage = storage_options(args)
    start_ray(args)
    summary = scan(
        args.inputs, args.out, storage=storage, include=args.include, exclude=args.exclude, progress=progress
    )
    print("\n".join(summary.lines()))
    return EXIT_OK


def _require_targets(cfg, args: argparse.Namespace):
    """Nothing is segmented for a prompt nobody wrote: --prompt, or a job file that names targets."""
    from mcs_batch.config import TargetConfig

    if not args.prompt and cfg.targets == (TargetConfig(),):
        raise ConfigError("--prompt is required (e.g. --prompt 'the lungs') unless the job file names targets")
    return cfg


def _config(args: argparse.Namespace):
    from mcs_batch.config import load_config

    prompts = args.prompt or ()
    cfg = load_config(args.config, overrides=args.set, preset=args.models, prompts=prompts, target=args.target)
    return _require_targets(cfg, args)


def cmd_explain(args: argparse.Namespace) -> int:
    from mcs_batch.explain import explain
    from mcs_batch.models.registry import load_models

    cfg = _config(args)
    storage = storage_options(args)
    models = load_models(cfg.models, storage=storage)
    if models.tiny:
        progress("TINY random models: the masks are meaningless (use --models real or a config with weights)")
    slices = [int(k) for k in args.slices.split(",")] if args.slices else None
    index = explain(args.inputs, Path(args.out), cfg, models, storage=storage, slices=slices, progress=progress)
    done = [i for i in index["images"] if i.get("targets")]
    failed = [i for i in index["images"] if i["status"] != "ok"]
    print(
        f"explained {len(done)} image(s) for {len(cfg.targets)} target(s) in {index['seconds']:.1f} s; "
        f"{len(failed)} case(s) not explained; see {Path(args.out) / 'explain.json'} and */overlay.png"
    )
    return EXIT_OK


def _weights_pins(models) -> dict[str, tuple[str, str | dict | None]]:
    """{"clip" | "sam": (URI, pinned digest(s) in the form `weights.verify` takes)} of a ModelsConfig."""
    clip_pin = {"open_clip_pytorch_model.bin": models.clip_sha256} if models.clip_sha256 else None
    return {"clip": (models.clip, clip_pin), "sam": (models.sam, models.sam_sha256)}


def cmd_weights_mirror(args: argparse.Namespace, cfg) -> int:
    """`weights prefill --from PREFIX` (the pods' init step) and `weights mirror --to PREFIX`: the config's
    weights between models.cache_dir and a mirror in object storage, without loading any model."""
    from mcs_batch.io.storage import protocol_of
    from mcs_batch.models.weights_mirror import mirror, prefill

    prefix = args.from_ if args.action == "prefill" else args.to
    if not prefix:
        raise ConfigError(
            f"weights {args.action}: {'--from' if args.action == 'prefill' else '--to'} PREFIX is required"
        )
    storage = storage_options(args)
    options = storage.fsspec_kwargs(protocol_of(prefix))
    cache_dir = Path(os.path.expanduser(cfg.models.cache_dir))
    for name, (uri, pin) in _weights_pins(cfg.models).items():
        if args.action == "prefill":
            done = prefill(uri, mirror=prefix, cache_dir=cache_dir, storage_options=options, expected=pin)
            said = f"copied {done.copied} file(s) from {done.source}/" if done.copied else "in the cache already"
            record = done.record
        else:
            source_options = storage.fsspec_kwargs(protocol_of(uri))
            record, target = mirror(uri, to=prefix, cache_dir=cache_dir, storage_options=options,
                                    source_storage_options=source_options, expected=pin)  # fmt: skip
            said = f"mirrored to {target}/"
        print(f"{name:5s} {uri}  {said}  sha256:{record.digest}{'  (pinned, verified)' if pin else ''}")
    return EXIT_OK


def cmd_weights(args: argparse.Namespace) -> int:
    from mcs_batch.models.weights import verify

    cfg = _config(args)
    if args.action in ("prefill", "mirror"):
        return cmd_weights_mirror(args, cfg)
    from mcs_batch.models.registry import load_models

    models = load_models(cfg.models, storage=storage_options(args))
    for name, record in sorted(models.weights.items()):
        for file, digest in sorted(record.files.items()):
            print(f"{name:5s} {record.uri}  {file}  sha256:{digest}")
        if args.action == "verify":
            pin = cfg.models.clip_sha256 if name == "clip" else cfg.models.sam_sha256
            if pin:
                verify(record, {"open_clip_pytorch_model.bin": pin} if name == "clip" else pin)
                print(f"{name:5s} pinned digest verified")
    if models.tiny:
        progress("these are TINY random models (no download needed)")
    return EXIT_OK


def cmd_import_hf(args: argparse.Namespace) -> int:
    from mcs_batch.models.hf_import import import_biomedclip_hf

    dst = import_biomedclip_hf(Path(args.src), Path(args.dst), base_folder=Path(args.base))
    print(f"open_clip folder written to {dst}; use it with --set models.clip={dst}")
    return EXIT_OK


def _job_config(args: argparse.Namespace):
    """The job config: file / preset / prompts, INPUT and --out, then --set."""
    from mcs_batch.config import load_config

    cfg = load_config(
        args.config,
        overrides=args.set,
        preset=args.models,
        prompts=args.prompt or (),
        target=args.target,
        inputs=args.inputs,
        out=args.out,
    )
    return _require_targets(cfg, args)


def run_segment(cfg, *, storage: StorageOptions, retry_failed: bool) -> int:
    from mcs_batch.pipeline import run_job

    if cfg.models.tiny:
        progress("TINY random models: the masks are meaningless (use --models real or a config with weights)")
    from mcs_batch.telemetry import wait_for_lingering

    try:
        summary = run_job(cfg, storage=storage, retry_failed=retry_failed, progress=progress)
        print("\n".join(summary.lines()))
        if summary.aborted:
            print(f"mcs-batch: error: {summary.aborted}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    finally:
        if cfg.outputs.metrics_port and cfg.outputs.metrics_linger_seconds > 0:
            progress(f"serving the final metrics on port {cfg.outputs.metrics_port} for "
                     f"{cfg.outputs.metrics_linger_seconds:g} s (outputs.metrics_linger_seconds)")  # fmt: skip
        wait_for_lingering()


def _require_inputs_and_out(cfg):
    """A job file names what to segment, never where a site's archive is: said before Ray starts."""
    if not cfg.inputs.uris:
        raise ConfigError("inputs.uris: no inputs given (INPUT..., or --set 'inputs.uris=[s3://bucket/prefix/]')")
    if not cfg.outputs.uri:
        raise ConfigError("outputs.uri: no output folder given (--out OUT, or --set outputs.uri=s3://bucket/prefix)")
    return cfg


def cmd_segment(args: argparse.Namespace) -> int:
    if args.shard:  # one shard of N as its own job (pipeline/shards.py): resources.shard
        args.set = [*(args.set or []), f"resources.shard={args.shard}"]
    cfg = _require_inputs_and_out(_job_config(args))
    storage = storage_options(args)
    start_ray(args)
    return run_segment(cfg, storage=storage, retry_failed=args.retry_failed)


def cmd_query(args: argparse.Namespace) -> int:
    from mcs_batch.query import OutputFormat, query_arrow, render

    fmt = OutputFormat(args.format)
    if fmt == OutputFormat.PARQUET and not args.output:
        raise ConfigError("query: --format parquet needs --output FILE")
    table = query_arrow(args.out, args.sql, storage=storage_options(args), as_of=args.as_of)
    data = render(table, fmt, width=args.max_width)
    if args.output:
        try:
            Path(args.output).write_bytes(data)
        except OSError as e:
            raise ConfigError(f"query: cannot write {args.output} ({e.strerror or e})") from e
    else:
        sys.stdout.write(data.decode())
    return EXIT_OK


def cmd_catalog(args: argparse.Namespace) -> int:
    """`catalog compact|vacuum|history|migrate OUT`: the Delta tables' upkeep (outputs/maintenance.py)."""
    from mcs_batch.outputs import maintenance
    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.outputs.migrate import migrate
    from mcs_batch.query import format_table

    storage = storage_options(args)
    if args.action == "migrate":
        for line in migrate(args.out, storage=storage, index=args.index).lines():
            print(line)
        return EXIT_OK
    catalog = Catalog(args.out, storage=storage)
    if not catalog.exists():
        raise ConfigError(
            f"catalog: {args.out}: no catalog here (expected catalog/cases; run `mcs-batch segment` first)"
        )
    if args.action == "compact":
        catalog.check_writable()
        for name, r in maintenance.compact(catalog, index=args.index or join(args.out, "index")).items():
            print(
                f"{name}: {r['files_before']} -> {r['files_after']} data file(s), version {r['version']}"
                + (f", {r['orphans_deleted']} orphan slice row(s) deleted" if r["orphans_deleted"] else "")
            )
    elif args.action == "vacuum":
        catalog.check_writable()
        if args.retention_hours is not None and args.retention_hours < 0:
            raise ConfigError("catalog vacuum: --retention-hours must be 0 or more")
        removed = maintenance.vacuum(catalog, retention_hours=args.retention_hours, dry_run=args.dry_run,
                                     index=args.index or join(args.out, "index"))  # fmt: skip
        verb = "would remove" if args.dry_run else "removed"
        for name, files in removed.items():
            print(f"{name}: {verb} {len(files)} file(s) no current row references")
    else:
        entries = maintenance.history(catalog, limit=args.limit)
        names = ["time", "table", "version", "operation", "run_id", "rows"]
        print(format_table(names, [tuple(e[n] for n in names) for e in entries]))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from mcs_batch.report import write_report

    if args.sample < 0:
        raise ConfigError("report: --sample must be 0 or more")
    summary = write_report(args.out, storage=storage_options(args), sample=args.sample, seed=args.seed,
                           progress=progress)  # fmt: skip
    print("\n".join(summary.lines()))
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from mcs_batch.testdata.sample import build_sample_archive

    dest = build_sample_archive(Path(args.dest))
    n = sum(1 for p in dest.rglob("*") if p.is_file())
    print(f"sample archive with {n} files written to {dest}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's first command: build the sample archive, scan it, and segment it (real weights
    when they are configured or already cached, else tiny random models, said loudly)."""
    from mcs_batch.config import MODEL_PRESETS, load_config
    from mcs_batch.models.weights import cache_key
    from mcs_batch.scan import scan
    from mcs_batch.testdata.sample import build_sample_archive

    out = Path(args.out)
    archive = build_sample_archive(out / "sample-archive")
    progress(f"sample archive written to {archive}")
    cache = Path(os.path.expanduser(load_config().models.cache_dir))
    real = MODEL_PRESETS["real"]
    cached = all((cache / cache_key(real[k])).exists() for k in ("models.clip", "models.sam"))
    preset = args.models or (None if args.config else "real" if cached else "tiny")  # a file names its weights
    if preset == "tiny":
        progress("no real weights configured or cached: using TINY random models (masks are meaningless); "
                  "`mcs-batch weights fetch --models real` where the network allows")  # fmt: skip
    start_ray(args)
    summary = scan([str(archive)], str(out / "scan"), progress=progress)
    print("\n".join(summary.lines()))
    segment_out = out / "segment"
    if segment_out.exists():
        shutil.rmtree(segment_out)  # the demo starts fresh each time
    cfg = load_config(
        args.config, preset=preset, prompts=["a lung", "the lungs in a chest image"], target="lungs",
        inputs=[str(archive)], out=str(segment_out), overrides=args.set,
    )  # fmt: skip
    code = run_segment(cfg, storage=StorageOptions(), retry_failed=False)
    print(f"\nlook at: {segment_out}/masks/*/lungs.nii.gz (and .png for 2D images), {segment_out}/catalog/,")
    print(f'         mcs-batch query {segment_out} "SELECT kind, status, mask_voxels, source_keys FROM cases"')
    return code


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", choices=["tiny", "real"], default=None, help="model preset (default: config / tiny)")
    p.add_argument("--config", default=None, help="job YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


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
    add_common_args(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("explain", help="run the method on images / slices and write maps, prompts, masks, overlays")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, DICOM series folders, NIfTI files")
    p.add_argument("--prompt", action="append", help="target prompt (repeatable: prompt ensembling)")
    p.add_argument("--target", default=None, help="target name for --prompt (default: target)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slices", default=None, help="comma-separated slice indices of volumes (default: middle)")
    _add_model_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("weights", help="fetch model weights into the cache, verify their digests, or copy them "
                                       "between the cache and a mirror in object storage")  # fmt: skip
    p.add_argument("action", choices=["fetch", "verify", "mirror", "prefill"],
                   help="fetch: download into models.cache_dir; verify: check the pinned digests; mirror: fetch, "
                        "then copy the cache entries to --to PREFIX; prefill: copy them from --from PREFIX into "
                        "models.cache_dir (no internet needed; a no-op for entries already there)")  # fmt: skip
    p.add_argument("--from", dest="from_", metavar="PREFIX", help="prefill: the mirror, e.g. s3://BUCKET/models/")
    p.add_argument("--to", metavar="PREFIX", help="mirror: where to write it, e.g. s3://BUCKET/models/")
    _add_model_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_weights, prompt=None, target=None)

    p = sub.add_parser("import-biomedclip-hf", help="convert HF-port BiomedCLIP weights into an open_clip folder")
    p.add_argument("src", help="state dict file in the Hugging Face port's key layout (.bin / .safetensors)")
    p.add_argument("dst", help="open_clip folder to write")
    p.add_argument("--base", required=True, help="an open_clip BiomedCLIP folder (config + tokenizer)")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("segment", help="segment every case of the inputs for the prompts (the cohort job)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="paths or URIs (default: inputs.uris of --config)")
    p.add_argument("--prompt", action="append", help="target prompt (repeatable: prompt ensembling)")
    p.add_argument("--target", default=None, help="target name for --prompt (default: target)")
    p.add_argument("--out", default=None, help="output folder or URI (default: outputs.uri of --config)")
    p.add_argument("--retry-failed", action="store_true", help="redo the (case, target) pairs that failed before")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="segment shard I of N of the archive (1-based), e.g. 2/4: for N separate jobs on one OUT; "
                        "one job can also run N shard drivers itself (resources.drivers)")  # fmt: skip
    _add_model_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("query", help="run SQL over the catalog (tables cases, slices, evaluation, manifest)")
    p.add_argument("out", help="output folder or URI of a segment run")
    p.add_argument("sql", help='e.g. "SELECT status, count(*) FROM cases GROUP BY status"')
    p.add_argument(
        "--format",
        choices=["table", "csv", "json", "parquet"],
        default="table",
        help="table (default), csv, json (newline-delimited: one object per line) or parquet (with --output)",
    )
    p.add_argument("--output", help="write the result to this file instead of stdout")
    p.add_argument("--max-width", type=int, default=0, help="cut table cells to this many characters (0: never)")
    p.add_argument("--as-of", default=None, metavar="VERSION|TIME|RUN_ID",
                   help="the tables as they stood: a cases table version, an ISO time, or a run id (the versions "
                        "its record names)")  # fmt: skip
    add_common_args(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("catalog", help="upkeep of the catalog's Delta tables: compact, vacuum, history, migrate")
    p.add_argument("action", choices=["compact", "vacuum", "history", "migrate"],
                   help="compact: small files into large ones (and a checkpoint); vacuum: remove files no current "
                        "row references; history: the tables' commits; migrate: convert a catalog of the layout "
                        "before Delta tables, in place")  # fmt: skip
    p.add_argument("out", help="output folder or URI of a segment run")
    p.add_argument("--retention-hours", type=int, default=None,
                   help="vacuum: keep the files of versions younger than this (default: each table's time-travel "
                        "window, a week)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="vacuum: list what would be removed, remove nothing")
    p.add_argument("--limit", type=int, default=20, help="history: commits per table (20)")
    p.add_argument("--index", default=None, help="the archive index, when not OUT/index (inputs.index)")
    add_common_args(p)
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("report", help="write a visual QC report (one HTML file) of a segment run to OUT/qc/")
    p.add_argument("out", help="output folder or URI of a segment run")
    p.add_argument("--sample", type=int, default=12, help="randomly sampled ok pairs to show (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (default: 0)")
    add_common_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="write the small real sample archive to a folder")
    p.add_argument("dest", help="destination folder (replaced)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="build the sample archive and run the pipeline on it")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    _add_model_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_demo)
    sub.add_parser("job", add_help=False, help="Ray's `ray job` client (submit, status, logs, stop, list): "
                   "the same, with a missing or wrong token or an unreachable head in one line")  # fmt: skip
    add_train_commands(sub)
    add_eval_commands(sub)
    return parser


def ray_job(argv: list[str]) -> int:
    """`mcs-batch job ...`: Ray's own `ray job ...` client (same arguments, output and exit codes), except
    that what stops the client before the head answers (no token, a wrong one, a head it cannot reach)
    is one line naming the address and what to do, exit 2, not Ray's traceback."""
    import click
    from ray.exceptions import AuthenticationError
    from ray.scripts.scripts import cli as ray_cli

    address = next((v for k, v in itertools.pairwise(argv) if k == "--address"), None)
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "the head"
    try:
        ray_cli.main(args=["job", *argv], prog_name="mcs-batch", standalone_mode=False)
    except AuthenticationError as e:
        reason = str(e).split("\n")[0].split(". ")[0].rstrip(".")
        raise ConfigError(f"{address}: {reason}; give the cluster's token as RAY_AUTH_TOKEN (or a file named "
                          "by RAY_AUTH_TOKEN_PATH) with RAY_AUTH_MODE=token: README, 'For ops'") from e  # fmt: skip
    except RuntimeError as e:  # the SDK's answer to an HTTP error (no such job: 404)
        if not str(e).startswith("Request failed with status code"):
            raise
        raise ConfigError(f"{address}: {str(e).splitlines()[0]}") from e
    except ConnectionError as e:
        reason = str(e).split("\n")[0]
        raise ConfigError(f"{address}: cannot reach the Ray dashboard ({type(e).__name__}: {reason})") from e
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        return EXIT_INTERRUPTED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["job"]:  # Ray's CLI parses its own arguments
        try:
            return ray_job(argv[1:])
        except ConfigError as e:
            print(f"mcs-batch: error: {e}", file=sys.stderr)
            return EXIT_USAGE
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
