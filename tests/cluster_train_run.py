"""Run the train job on a local three-node Ray cluster whose two worker nodes declare 2 GPUs each.

There are no real GPUs: Ray schedules by the declared resources and sets each member's GPU ids,
while torch finds no CUDA device and trains on the CPU. Run by test_train_cluster.py in its own
process, because a cluster cannot share a process with the test session's Ray instance.

    python cluster_train_run.py DATA OUT MODEL_TOML   -> last stdout line: PLACEMENT <json>
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster

from ray.cluster_utils import Cluster

from speclabel.jobs.train import TrainJob, read_model_config, run_training

SMALL_OBJECT_STORE = 80 * 2**20


def main(data: str, out: str, config: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "object_store_memory": SMALL_OBJECT_STORE},
    )
    workers = [
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=SMALL_OBJECT_STORE) for _ in range(2)
    ]
    cluster.wait_for_nodes()
    try:
        job = TrainJob(data=data, out=out, address=cluster.address, **read_model_config(config))
        outcome = run_training(job, echo=lambda line: print(line, file=sys.stderr))
        placement = {
            "worker_nodes": [node.node_id for node in workers],
            "members": [dataclasses.asdict(member) for member in outcome.members],
        }
        print("PLACEMENT " + json.dumps(placement), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
