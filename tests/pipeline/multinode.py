"""A multi-node local Ray cluster running the job: run as a script by test_multinode.py (a process of its
own, since one process connects to one Ray cluster).

    python -m tests.pipeline.multinode INPUT OUT CACHE TMP [--remove-node]

ray.cluster_utils.Cluster starts a head (2 CPUs, no GPU) and two worker nodes declaring 2 CPUs and 2
GPUs each (fake: these machines have no GPU; Ray assigns the ids, CUDA stays unavailable). The job
runs with `resources: auto` (small blocks, so that work is spread) and one driver (tests/pipeline/
test_shards.py runs shard drivers). With --remove-node, one worker node
is removed once the job's 8 model actors have registered with its board. The cluster is this
process's own (its own temp dir, ports picked free) and is shut down through its own API, never
`ray stop`. The last line printed is a JSON result.
"""

from __future__ import annotations

import json
import sys
import threading
import time

RESULT = "multinode-result: "


def model_actors() -> int:
    """Model actors registered with the running job's board (0 before it exists)."""
    import ray

    for name in ray.util.list_named_actors():
        if name.startswith("mcs-batch-board-"):
            try:
                actors = ray.get(ray.get_actor(name).snapshot.remote(), timeout=10)["actors"]
            except Exception:
                return 0
            return sum(1 for a in actors if a["stage"] in ("saliency", "sam"))
    return 0


def main(argv: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from mcs_batch.config import load_config
    from mcs_batch.pipeline import run_job

    inputs, out, cache, tmp = argv[:4]
    remove = "--remove-node" in argv
    common = {"object_store_memory": 128 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "temp_dir": tmp, **common})
    workers = [cluster.add_node(num_cpus=2, num_gpus=2, **common) for _ in range(2)]
    cluster.wait_for_nodes()
    lines: list[str] = []
    removed: list[str] = []
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        cfg = load_config(preset="tiny", prompts=["a bright lesion"], target="lesion", inputs=[inputs], out=out,
                          overrides=[f"models.cache_dir={cache}", "outputs.catalog_flush_cases=1",
                                     "resources.block_rows=4",
                                     "resources.drivers=1"])  # fmt: skip
        if remove:

            def remover() -> None:  # once every model actor is up (work is flowing), a worker node goes away
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and model_actors() < 8:
                    time.sleep(0.2)
                removed.append(workers[1].node_id)
                cluster.remove_node(workers[1])

            threading.Thread(target=remover, daemon=True).start()
        summary = run_job(cfg, progress=lines.append)
        result = {"by_status": summary.by_status, "cases": summary.cases, "aborted": summary.aborted,
                  "run_id": summary.run_id, "workers": [w.node_id for w in workers], "head": cluster.head_node.node_id,
                  "removed": removed, "progress": lines}  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
