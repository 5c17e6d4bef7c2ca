"""`mcs-batch finetune-clip`: fine-tune BiomedCLIP with DHN-NCE on Ray Train (registered by mcs_batch.cli).

    mcs-batch finetune-clip --config jobs/configs/finetune_tiny.yaml \\
        --set data.listing=s3://bucket/pairs.parquet --set output.uri=s3://bucket/models/biomedclip-ft

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
