"""Training commands (registered by mcs_batch.cli):

    mcs-batch finetune-clip --config jobs/configs/finetune_tiny.yaml \\
        --set data.listing=s3://bucket/pairs.parquet --set output.uri=s3://bucket/models/biomedclip-ft
    mcs-batch train-weak --from OUT --target lesion --work s3://bucket/weak/lesion [--config ...] [--refine]
    mcs-batch refine --from OUT --target lesion --work s3://bucket/weak/lesion

Exit codes as for every command: 0 done, 1 training did not finish (run the same command again to
resume from the last checkpoint), 2 bad configuration or inputs.
"""

from __future__ import annotations

import argparse
import json
import sys

from mcs_batch.cli_common import EXIT_FAILED, EXIT_OK, add_common_args, progress, start_ray, storage_options


def cmd_finetune_clip(args: argparse.Namespace) -> int:
    from mcs_batch.train.config import load_finetune_config
    from mcs_batch.train.finetune import FinetuneError, finetune_clip

    cfg = load_finetune_config(args.config, overrides=args.set)
    cfg.check_required()
    storage = storage_options(args)
    start_ray(args)
    try:
        result = finetune_clip(cfg, storage=storage, progress=progress)
    except FinetuneError as e:
        print(f"mcs-batch: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    final = result.card["metrics"].get("final") or {}
    shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("i2t", "t2i"))}
    print(f"fine-tuned model written to {result.output_uri} ({result.summary.get('steps')} steps)")
    print(f"validation retrieval at the end: {json.dumps(shown)}")
    print(f"use it with: mcs-batch segment ... --set models.clip={result.output_uri}")
    return EXIT_OK


def add_commands(subparsers) -> None:
    """Register `finetune-clip` on the main parser's subcommands."""

    p = subparsers.add_parser("finetune-clip", help="fine-tune BiomedCLIP on image-caption pairs (DHN-NCE, Ray Train)")
    p.add_argument("--config", default=None, help="finetune YAML file (see jobs/configs/finetune_tiny.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    add_common_args(p)
    p.set_defaults(func=cmd_finetune_clip)
    add_weak_commands(subparsers)


def absolute_local_paths(cfg):
    """The config with a local OUT and WORK made absolute: Ray Train's workers run in a working folder
    of their own, where a relative WORK would not be found. URIs (s3://, file://) stay as given."""
    import dataclasses
    import os

    def absolute(uri: str) -> str:
        return os.path.abspath(uri) if uri and "://" not in uri else uri

    return dataclasses.replace(cfg, source=absolute(cfg.source), work=absolute(cfg.work))


def _weak_config(args: argparse.Namespace):
    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.train import check_source

    cfg = load_weak_config(args.config, overrides=args.set, source=args.source, target=args.target, work=args.work)
    cfg = absolute_local_paths(cfg)
    cfg.check_required()
    check_source(cfg, storage_options(args))
    return cfg


def cmd_train_weak(args: argparse.Namespace) -> int:
    from mcs_batch.train.weak.train import TrainWeakError, train_weak

    cfg = _weak_config(args)
    storage = storage_options(args)
    start_ray(args)
    try:
        ensemble = train_weak(cfg, storage=storage, progress=progress)
    except TrainWeakError as e:
        print(f"mcs-batch: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"checkpoint ensemble of {len(ensemble['members'])} member checkpoint(s) in {cfg.work}/ensemble "
          f"({ensemble['seconds']} s; {ensemble['decision']['decision']})")  # fmt: skip
    if args.refine:
        return _run_refine(cfg, storage, case_ids=None)
    print(f"refine the masks with: mcs-batch refine --from {cfg.source} --target {cfg.target} --work {cfg.work}")
    return EXIT_OK


def _run_refine(cfg, storage, case_ids) -> int:
    from mcs_batch.train.weak.refine import refine

    summary = refine(cfg, storage=storage, case_ids=case_ids, progress=progress)
    cases = summary["cases"]
    print(f"refined target {cfg.refined_target}: {cases.get('ok', 0)} ok, {cases.get('failed', 0)} failed "
          f"(run {summary['run_id']}); compare with: mcs-batch query {cfg.source} "
          f"\"SELECT target, count(*), avg(mask_voxels) FROM cases GROUP BY target\"")  # fmt: skip
    return EXIT_FAILED if cases.get("failed") else EXIT_OK


def cmd_refine(args: argparse.Namespace) -> int:
    from mcs_batch.train.weak.ensemble import read_ensemble

    cfg = _weak_config(args)
    storage = storage_options(args)
    read_ensemble(cfg.work, storage)  # none there: a one-line error before Ray starts
    start_ray(args)
    return _run_refine(cfg, storage, case_ids=args.case or None)


def _add_weak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", default=None, help="OUT of a segmentation run (local or s3://)")
    p.add_argument("--target", default=None, help="the zero-shot target whose masks are the pseudo-labels")
    p.add_argument("--work", default=None, help="folder / URI for the dataset, checkpoints and the ensemble")
    p.add_argument("--config", default=None, help="YAML file (see jobs/configs/train_weak.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    add_common_args(p)


def add_weak_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "train-weak", help="train an nnU-Net checkpoint ensemble on a run's masks (pseudo-labels, Ray Train)"
    )
    _add_weak_args(p)
    p.add_argument("--refine", action="store_true", help="then refine the run's masks with the ensemble")
    p.set_defaults(func=cmd_train_weak)
    p = subparsers.add_parser("refine", help="refine a run's masks with a trained ensemble (target <T>@weak)")
    _add_weak_args(p)
    p.add_argument("--case", action="append", default=[], metavar="CASE_ID", help="only these cases (repeatable)")
    p.set_defaults(func=cmd_refine)
