"""Entry point for `ray job submit`: the cohort segmentation job, configured by a YAML file.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/segment_cohort.py \\
        --config jobs/configs/lung_ct.yaml \\
        --set 'inputs.uris=[s3://archive/chest-ct/]' --set outputs.uri=s3://results/lung-ct [--retry-failed]

(with RAY_AUTH_MODE=token and the cluster's token, see README.md "For ops"). The job files name what to
segment and how; where a site's archive is and where its results go (inputs.uris / INPUT...,
outputs.uri / --out) always come from the command. Inside a Ray job, RAY_ADDRESS is set by Ray, so
the job runs on the cluster it was submitted to.
"""

from __future__ import annotations

import sys

from mcs_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
