"""A sweep across a multi-node Ray cluster run on this machine: trials spread over nodes, all results in MLflow.

The cluster is a head with no CPUs and two worker nodes with one CPU each, every node a
separate raylet (`ray start --head`, then `ray start --address HEAD` twice) with its own free
ports, token authentication on, and its own process session (tests/ray_cluster.py); the
trials can only run on the workers and, one CPU each, two at a time only on different nodes.
The driver runs beside the head and is the only process that writes to MLflow.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ray_cluster import LEAN_SWEEP_FLAGS, SIGMA_SCRIPT, RayCluster, assert_one_run_per_trial, tune_trial_ids

pytestmark = pytest.mark.slow

EPOCHS = 2
TRIALS = 3


@pytest.fixture(scope="module")
def cluster(data_dir):
    started = time.monotonic()
    cluster = RayCluster.start(data_dir, workers=2, head_cpus=0, worker_cpus=1)
    print(f"3-node Ray cluster up in {time.monotonic() - started:.0f}s")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_sweep_spreads_over_worker_nodes_and_reaches_mlflow_through_the_head(cluster, tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    storage = cluster.tmp / "shared_results"  # one folder all nodes reach (they share this machine)
    cmd = [sys.executable, str(SIGMA_SCRIPT), "--address", cluster.address, *LEAN_SWEEP_FLAGS,
           "--num-samples", str(TRIALS), "--epochs", str(EPOCHS), "--max-concurrent", "2", "--cpus-per-trial", "1",
           "--evaluate-top", "1", "--eval-limit", "100", "--eval-steps", "2", "--no-tsne",
           "--storage-path", str(storage), "--tracking-uri", f"sqlite:///{db}", "--name", "multinode"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=420,
                          start_new_session=True)
    print(f"{TRIALS}-trial sweep on 3 nodes: {time.monotonic() - started:.0f}s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"{cluster.address.split(':')[1]}: 3 node(s), 2 CPUs" in proc.stderr, proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{db}")
    trial_ids = tune_trial_ids(storage / "multinode")
    assert len(trial_ids) == TRIALS
    parent, trials = assert_one_run_per_trial(client, "raven-sigma-aug", trial_ids, EPOCHS)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raven.ray_cluster"].endswith(f":{cluster.port}")
    assert parent.data.tags["raven.ray_nodes"] == "3"

    workers = {n.node_id for n in cluster.workers}
    nodes_of = {r.data.tags["raven.trial_id"]: r.data.tags["raven.node_ids"].split(",") for r in trials}
    for trial_id, nodes in nodes_of.items():
        assert len(nodes) == 1 and nodes[0] in workers, (trial_id, nodes, workers)  # never on the 0-CPU head
        run = next(r for r in trials if r.data.tags["raven.trial_id"] == trial_id)
        assert run.data.tags["raven.node_id"] == nodes[0]
    used = {n for nodes in nodes_of.values() for n in nodes}
    assert len(used) >= 2, f"all trials ran on one node: {nodes_of}"

    # The best trial's evaluation ran as a Ray task on a worker; its record came back through the driver.
    exp = client.get_experiment_by_name("raven-sigma-aug")
    evaluations = client.search_runs([exp.experiment_id], "tags.`raven.role` = 'evaluation'")
    assert len(evaluations) == 1 and evaluations[0].info.status == "FINISHED"
    assert "clean_accuracy" in evaluations[0].data.metrics
    assert evaluations[0].data.tags["raven.trial_id"] in trial_ids
