"""Entry point for `ray job submit`: weakly supervised retraining on a segmentation run's masks.

    ray job submit --working-dir . -- python jobs/train_weak.py \\
        --from s3://bucket/out --target lesion --work s3://bucket/weak/lesion \\
        --config jobs/configs/train_weak.yaml [--set run.num_workers=4 --set run.use_gpu=true] [--refine]

Inside a Ray job, RAY_ADDRESS is set by Ray, so training runs on the cluster it was submitted to.
Submitting the same command again after an interruption resumes from the newest checkpoint.
"""

from __future__ import annotations

import sys

from mcs_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-weak", *sys.argv[1:]]))
