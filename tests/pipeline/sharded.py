"""Sharded drivers on a multi-node local Ray cluster: run as a script by test_shards.py (a process of
its own, since one process connects to one Ray cluster).

    python -m tests.pipeline.sharded INPUT WORK CACHE TMP

ray.cluster_utils.Cluster starts a head and two worker nodes of 2 CPUs each (no GPU: one model actor
per driver, resources.sam_actors=1, keeps five jobs affordable on a 2-core machine). On the same
cluster, each into its own OUT under WORK: the job with one driver (the reference), with 2 shard
drivers, with 3 one of which is killed (ray.kill, as a lost process) once the job's first commit has
landed, and as two separate `--shard` jobs (1/2 then 2/2). The cluster is this
process's own (its own temp dir, ports picked free) and is shut down through its own API, never
`ray stop`. The last line printed is a JSON result.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

RESULT = "sharded-result: "


def killer(out: Path, killed: list[str]) -> None:
    """Once OUT has its first committed case, kill a shard driver actor (the first found by name)."""
    import ray

    from mcs_batch.outputs.catalog import Catalog
    from mcs_batch.pipeline.shards import SHARD_ACTOR_PREFIX

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            committed = Catalog(str(out)).cases(["case_id"]).num_rows
        except Exception:
            committed = 0
        names = sorted(n for n in ray.util.list_named_actors() if n.startswith(SHARD_ACTOR_PREFIX))
        if committed and names:
            ray.kill(ray.get_actor(names[0]), no_restart=True)
            killed.append(names[0])
            return
        time.sleep(0.2)


def main(argv: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from mcs_batch.config import load_config
    from mcs_batch.pipeline import run_job

    inputs, work, cache, tmp = argv[:4]
    common = {"object_store_memory": 128 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "temp_dir": tmp, **common})
    for _ in range(2):
        cluster.add_node(num_cpus=2, **common)
    cluster.wait_for_nodes()
    result: dict = {}
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

        def segment(name: str, *settings: str) -> dict:
            out = Path(work) / name
            lines: list[str] = []
            killed: list[str] = []
            cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion", inputs=[inputs],
                              out=str(out), overrides=[f"models.cache_dir={cache}", "outputs.catalog_flush_cases=1",
                                                       "inputs.wave_objects=2", "resources.sam_actors=1",
                                                       "resources.block_rows=4", *settings])  # fmt: skip
            if name == "three":
                threading.Thread(target=killer, args=(out, killed), daemon=True).start()
            summary = run_job(cfg, progress=lines.append)
            return {"by_status": summary.by_status, "cases": summary.cases, "aborted": summary.aborted,
                    "run_id": summary.run_id, "killed": killed, "progress": lines}  # fmt: skip

        result["one"] = segment("one", "resources.drivers=1")
        result["two"] = segment("two", "resources.drivers=2")
        result["three"] = segment("three", "resources.drivers=3")  # one of its drivers killed
        result["separate"] = [segment("separate", "resources.shard=1/2"), segment("separate", "resources.shard=2/2")]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
