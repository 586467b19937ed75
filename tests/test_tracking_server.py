"""A sweep recorded by a real tracking server: `mlflow server` on PostgreSQL with proxied artifacts.

This is the store cluster/README.md recommends for clusters. The test starts a throw-away
PostgreSQL (initdb in a temporary folder, a free loopback port, run as the `postgres` user when
the tests run as root), an `mlflow server --backend-store-uri postgresql://... --artifacts-destination
<folder>` on another free port, runs a smoke sweep against http://127.0.0.1:PORT, and reads runs,
metrics and artifacts back through MlflowClient (and the rows through PostgreSQL itself). Both
servers run in sessions of their own and are stopped through them.

Skipped where the PostgreSQL server binaries are missing; CI installs them
(`apt-get install -y postgresql`) and the driver (`psycopg2-binary`, in the `test` extra).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest
import torch

from ray_cluster import (LEAN_SWEEP_FLAGS, SIGMA_SCRIPT, MlflowServer, PostgresServer, assert_one_run_per_trial,
                         base_env, load_logged_model, postgres_unavailable, short_tmpdir, stop_session,
                         tune_trial_ids)

pytestmark = pytest.mark.slow

EPOCHS = 2
TRIALS = 2


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """(PostgresServer, MlflowServer, artifacts folder): one pair of servers for this file."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2-binary is not installed (test extra)")
    started = time.monotonic()
    postgres = PostgresServer()
    server = None
    try:
        uri = postgres.start("mlflow")
        artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        server = MlflowServer(uri, artifacts, env=env, log_path=postgres.tmp / "mlflow-server.log")
        server.start()
        print(f"PostgreSQL + mlflow server up in {time.monotonic() - started:.0f}s")
        yield postgres, server, artifacts
    finally:
        if server is not None:
            server.stop()
        postgres.stop()


def test_sweep_recorded_by_mlflow_server_on_postgresql(tracking_server, tmp_path, data_dir):
    from mlflow import MlflowClient

    postgres, server, artifacts = tracking_server
    ray_tmp = short_tmpdir()
    env = base_env(data_dir, ray_tmp)
    env["RAY_TMPDIR"] = str(ray_tmp)  # the sweep's own local Ray, invisible to address='auto' elsewhere
    cmd = [sys.executable, str(SIGMA_SCRIPT), *LEAN_SWEEP_FLAGS, "--num-samples", str(TRIALS),
           "--epochs", str(EPOCHS), "--evaluate-top", "1", "--eval-limit", "100", "--eval-steps", "2", "--no-tsne",
           "--tracking-uri", server.uri, "--name", "on-postgres"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_session(proc.pid)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"sweep against mlflow server on PostgreSQL: {time.monotonic() - started:.0f}s")
    assert proc.returncode == 0, stderr[-6000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # nothing local

    client = MlflowClient(server.uri)
    trial_ids = tune_trial_ids(tmp_path / "ray_results" / "on-postgres")
    assert len(trial_ids) == TRIALS
    parent, trials = assert_one_run_per_trial(client, "raven-sigma-aug", trial_ids, EPOCHS)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raven.sweep_name"] == "on-postgres"
    assert {"best_val_robust_accuracy", "best_sigma_aug"} <= set(parent.data.metrics)
    assert parent.data.params["budget.num_samples"] == str(TRIALS)

    # Artifacts go through the server (proxied) into --artifacts-destination, and come back.
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "optimization_history.png", "raven_sweep.json"} <= names, names
    local = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path / "download"))
    with open(local) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial_id"] for r in rows) == trial_ids
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"trials.csv", "optimization_history.png", "checkpoint.pt", "MLmodel"} <= stored, stored

    exp = client.get_experiment_by_name("raven-sigma-aug")
    evaluations = client.search_runs([exp.experiment_id], "tags.`raven.role` = 'evaluation'")
    assert len(evaluations) == 1
    ev = evaluations[0]
    assert ev.info.status == "FINISHED" and ev.data.tags["raven.trial_id"] in trial_ids
    assert "clean_accuracy" in ev.data.metrics and "adv_acc_kl_delta_0.1" in ev.data.metrics
    assert "checkpoint/checkpoint.pt" in {a.path for a in client.list_artifacts(ev.info.run_id, "checkpoint")}
    model = load_logged_model(server.uri, ev.data.tags["raven.model_uri"])
    mu, _ = model.encode(torch.zeros(2, 784))
    assert mu.shape == (2, 10)

    # The record lives in PostgreSQL: the parent, one run per trial, the evaluation.
    (count,), = postgres.query("mlflow", "SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'")
    assert count == 1 + TRIALS + 1
    (steps,), = postgres.query("mlflow", "SELECT count(*) FROM metrics WHERE key = 'epoch'")
    assert steps == TRIALS * EPOCHS
