"""The `evaluate` and `reproduce` commands (registered into `mcs-batch` by mcs_batch.cli.build_parser).

Expected problems (no truth found, missing data or weights, a bad mapping file) raise ConfigError:
one line, exit 2. Both exit 1 when some truth could not be compared (listed in their output).
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

from mcs_batch.cli_common import EXIT_FAILED, EXIT_OK, add_common_args, progress, start_ray, storage_options
from mcs_batch.errors import ConfigError

SHOW_PROBLEMS = 10


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mcs_batch.errors import CaseError
    from mcs_batch.eval.datasets import list_truth, read_mapping
    from mcs_batch.eval.evaluate import evaluate
    from mcs_batch.io.storage import fetch_bytes, filesystem_for

    storage = storage_options(args)
    listing = list_truth(args.truth, storage=storage)
    items = listing.items
    if args.mapping:
        try:
            fs, _ = filesystem_for(args.mapping, storage)
            text = fetch_bytes(fs, args.mapping).decode("utf-8-sig")
        except (CaseError, UnicodeDecodeError) as e:
            raise ConfigError(f"--mapping {args.mapping}: cannot read ({e})") from e
        items, _ = read_mapping(text, listing, name=args.mapping)
    if not items:
        raise ConfigError(
            f"{args.truth}: no ground truth found (PNG/JPEG masks, NIfTI label maps, DICOM SEG, or test_masks/)"
        )
    dataset = args.dataset or posixpath.basename(args.truth.rstrip("/")) or "dataset"
    result = evaluate(
        args.out,
        items,
        truth_root=args.truth,
        dataset=dataset,
        target=args.target,
        storage=storage,
        tolerance=args.tolerance,
        label=args.truth_label,
        problems=listing.problems,
        progress=progress,
    )
    print("\n".join(result.lines()))
    for line in listing.problems[:SHOW_PROBLEMS]:
        print(f"  note: {line}")
    if len(listing.problems) > SHOW_PROBLEMS:
        print(f"  note: ... and {len(listing.problems) - SHOW_PROBLEMS} more")
    print(f"per-case rows: {result.table_uri}")
    print(f"  e.g. python -c \"import pandas; print(pandas.read_parquet('{result.table_uri}'))\"")
    return EXIT_FAILED if result.by_status.get("truth_error") else EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from mcs_batch.config import ABLATIONS
    from mcs_batch.eval.reproduce import (
        ablation_lines,
        default_configs_dir,
        plan_runs,
        run_reproduce,
        select_datasets,
        settings_lines,
        zero_shot_lines,
    )
    from mcs_batch.pipeline import run_job

    storage = storage_options(args)
    configs = Path(args.configs) if args.configs else default_configs_dir()
    if configs is None:
        raise ConfigError("cannot find jobs/configs/ (the paper's job files): run in the repository or pass --configs")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else None
    ablations = ABLATIONS if args.ablation else ("full",)
    plan, missing = plan_runs(
        args.data,
        args.out,
        datasets=select_datasets(names),
        ablations=ablations,
        configs_dir=configs,
        models=args.models,
        sam=args.sam or ("vit_h" if args.models == "real" else "vit_b"),
        overrides=args.set,
        storage=storage,
    )
    if missing:
        print(f"mcs-batch reproduce: missing under {args.data}:", file=sys.stderr)
        print("\n".join(missing), file=sys.stderr)
        print("  layout: DIR/<task>/test_images/*.png with the masks in DIR/<task>/test_masks/ "
              "(same file names, or NAME_mask.png)", file=sys.stderr)  # fmt: skip
        raise ConfigError(
            f"cannot reproduce: {len(missing)} thing(s) missing (listed above); nothing was run "
            "(--datasets runs a subset)"
        )
    start_ray(args)
    report = run_reproduce(plan, run_job=run_job, storage=storage, tolerance=args.tolerance, progress=progress)
    lines = []
    for run in report.runs:  # each task's full evaluation (the method's row)
        if run.ablation == "full" and run.result is not None:
            lines += [*run.result.lines(), ""]
    lines += settings_lines([cfg for _, _, cfg, _ in plan])
    lines += ["", *zero_shot_lines(report)]
    if args.ablation:
        lines += ["", *ablation_lines(report)]
    lines += ["", f"per-case rows: {args.out}/<task>/<ablation>/catalog/evaluation/"]
    print("\n".join(lines))
    truth_errors = sum(r.result.by_status.get("truth_error", 0) for r in report.runs if r.result is not None)
    return EXIT_FAILED if truth_errors else EXIT_OK


def add_commands(sub) -> None:
    """Register `evaluate` and `reproduce` on the main parser's subparsers."""

    p = sub.add_parser("evaluate", help="score a segment run's masks against ground truth (Dice, NSD, HD95)")
    p.add_argument("out", help="output folder or URI of a segment run (its catalog and masks)")
    p.add_argument("--truth", required=True, help="ground truth: masks / NIfTI / DICOM SEG folder, or test_masks/")
    p.add_argument("--target", default=None, help="target to evaluate (default: the only one in OUT)")
    p.add_argument("--mapping", default=None, help="CSV: truth,case_id (or truth,source_key / truth,series_uid)")
    p.add_argument("--dataset", default=None, help="dataset name in the table (default: the truth folder's name)")
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance: mm, or pixels for 2D images (2)")
    p.add_argument("--truth-label", default=None, help="label value (or SEG segment number / label) to use")
    add_common_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="the paper's zero-shot table (and ablation) on its four public datasets")
    p.add_argument("--data", required=True, help="folder with breast_tumors/, brain_tumors/, lung_xray/, lung_ct/")
    p.add_argument("--models", choices=["tiny", "real"], default="real", help="model preset (default: real)")
    p.add_argument("--ablation", action="store_true", help="also the rows saliency / postprocess / components")
    p.add_argument("--out", default="reproduce-out", help="outputs, one folder per task and row (default: %(default)s)")
    p.add_argument("--datasets", default=None, help="comma-separated subset: breast_us,brain_mri,lung_xray,lung_ct")
    p.add_argument("--sam", choices=["vit_b", "vit_h"], default=None, help="SAM variant (default: the paper's vit_h)")
    p.add_argument("--configs", default=None, help="folder of the job files (default: jobs/configs/)")
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in pixels (default: 2, the paper's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every job")
    add_common_args(p)
    p.set_defaults(func=cmd_reproduce)
