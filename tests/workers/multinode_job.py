"""Train on a two-node Ray cluster on this machine and compare with one node.

Run by ``test_multinode.py`` in its own process, because it needs its own Ray
(a head and a second node, each with a resource that pins workers to it).
Prints one JSON line: where the workers ran and whether the runs agree.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from dataclasses import dataclass

import numpy as np
import ray
from ray.cluster_utils import Cluster

from tests.workers.conftest import CNN, job_spec, small_digits, timings_removed
from workers.trainer import JobEvent, final_weights, run_job

NODE_OBJECT_STORE_BYTES = 100 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Outcome:
    node_ids: list[str]
    weights: dict[str, np.ndarray]
    history: list[dict[str, float]]


def train(resources: list[dict[str, float]]) -> Outcome:
    events: list[JobEvent] = []
    history: list[dict[str, float]] = []
    result = run_job(
        job_spec(CNN, epochs=2),
        small_digits(),
        num_workers=len(resources),
        resources_per_worker=resources,
        on_event=events.append,
        on_epoch=lambda epoch, metrics: history.append(timings_removed(metrics)),
    )
    started = next(e for e in events if e.kind == "group_started")
    return Outcome(
        node_ids=list(started.data["node_ids"]),
        weights=final_weights(result.checkpoint),
        history=history,
    )


def main() -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "gcs_server_port": free_port(),
            "num_cpus": 2,
            "resources": {"node_a": 4},
            "include_dashboard": False,
            "object_store_memory": NODE_OBJECT_STORE_BYTES,
        },
    )
    try:
        cluster.add_node(
            num_cpus=2, resources={"node_b": 4}, object_store_memory=NODE_OBJECT_STORE_BYTES
        )
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        # Ranks alternate between the nodes, so a node's ranks are not contiguous.
        two_nodes = train([{"node_a": 1}, {"node_b": 1}, {"node_a": 1}, {"node_b": 1}])
        one_node = train([{"node_b": 1}, {"node_b": 1}])
        same_weights = two_nodes.weights.keys() == one_node.weights.keys() and all(
            np.array_equal(two_nodes.weights[k], one_node.weights[k]) for k in two_nodes.weights
        )
        report = {
            "two_nodes": two_nodes.node_ids,
            "one_node": one_node.node_ids,
            "same_weights": same_weights,
            "same_metrics": two_nodes.history == one_node.history,
            "epochs": len(two_nodes.history),
        }
        print(json.dumps(report))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
    sys.exit(0)
