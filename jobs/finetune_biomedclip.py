"""Entry point for `ray job submit`: fine-tune BiomedCLIP with DHN-NCE on Ray Train (YAML-configured).

    ray job submit --working-dir . -- python jobs/finetune_biomedclip.py \\
        --config jobs/configs/finetune_tiny.yaml \\
        [--set data.listing=s3://datasets/pairs/train.parquet] [--set run.storage_path=s3://runs/ckpt] \\
        [--set output.uri=s3://models/biomedclip-dhn-nce] [--set run.use_gpu=true]

Inside a Ray job, RAY_ADDRESS is set by Ray, so training runs on the cluster it was submitted to.
Submitting the same command again after an interruption resumes from the newest checkpoint.
"""

from __future__ import annotations

import sys

from mcs_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune-clip", *sys.argv[1:]]))
