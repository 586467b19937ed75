"""Faults a sweep survives without losing or duplicating anything in MLflow.

(a) a worker node dies mid-trial (SIGKILL to its raylet's whole process session): Tune's
    FailureConfig(max_failures) restarts the trial from its last checkpoint on another node;
(b) the driver is killed (SIGKILL) mid-sweep: `--resume` completes the sweep (the gentle case,
    Ctrl-C, is tests/test_sweep.py::test_interrupted_sweep_resumes_without_repeating_anything);
(c) the MLflow tracking server is killed mid-sweep and restarted ~15 s later on the same port
    and store: the sweep carries on, queues its writes and delivers each of them once (and,
    without Ray, the write queue itself: order, a lost answer, a driver dying during the outage,
    reads that do not wait while the store is down);
(d) the tracking server is killed after the first epoch and stays away past the end: the sweep
    finishes its work, waits once (--tracking-wait) and ends with one line; `--resume` replays.

Each test ends by checking the final MLflow record: exactly one run per Tune trial, every
epoch's metrics present exactly once. The Ray tests share one cluster (a head with no CPUs and
two one-CPU worker nodes, tests/ray_cluster.py); the destructive one, (a), runs last.
"""

from __future__ import annotations

import json
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_cluster import (
    LEAN_SWEEP_FLAGS,
    SIGMA_SCRIPT,
    MlflowServer,
    RayCluster,
    assert_one_run_per_trial,
    base_env,
    checkpoint_reports,
    kill_session,
    short_tmpdir,
    stop_session,
    wait_for,
)

EXPERIMENT = "raven-sigma-aug"


@pytest.fixture(scope="module")
def cluster(data_dir):
    cluster = RayCluster.start(data_dir, workers=2, head_cpus=0, worker_cpus=1)
    try:
        yield cluster
    finally:
        cluster.stop()


class Driver:
    """A sweep driver in its own session, its output in a file the test reads while it runs."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(SIGMA_SCRIPT), *args], env=env, cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"sweep still running after {timeout:.0f}s:\n{self.output[-6000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        stop_session(self.proc.pid)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def sweep_args(cluster: RayCluster, work: Path, name: str, epochs: int, trials: int, concurrent: int,
               tracking_uri: str | None = None) -> list[str]:
    return ["--address", cluster.address, *LEAN_SWEEP_FLAGS, "--num-samples", str(trials), "--epochs", str(epochs),
            "--max-concurrent", str(concurrent), "--cpus-per-trial", "1", "--name", name,
            "--storage-path", str(work / "ray_results"),
            "--tracking-uri", tracking_uri or f"sqlite:///{work / 'mlflow.db'}"]


def tune_trials(experiment_dir: Path) -> list[str]:
    """The trial ids of the sweep's saved Tune state (what --resume restores)."""
    from ray.tune import ExperimentAnalysis

    return sorted(t.trial_id for t in ExperimentAnalysis(str(experiment_dir)).trials)


def epoch_lines(output: str, trial_id: str) -> list[int]:
    return [int(m) for m in re.findall(rf"trial {trial_id} epoch (\d+)/", output)]


# ----------------------------------------------------------------------------- the write queue (no Ray)


class FlakyClient:
    """An MlflowClient whose store can be 'down' (every call refused) or drop the answer to one write."""

    def __init__(self, real) -> None:
        self.real = real
        self.down = False
        self.lose_next_answer = False

    def __getattr__(self, name):
        import requests

        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                raise requests.exceptions.ConnectionError("Connection refused")
            out = attr(*args, **kwargs)
            if self.lose_next_answer and name == "log_batch":
                self.lose_next_answer = False  # the write reached the store, its answer did not
                raise requests.exceptions.ConnectionError("Connection reset by peer")
            return out

        return call


def test_write_queue_keeps_order_survives_the_driver_and_writes_each_epoch_once(tmp_path):
    import json

    from mlflow.exceptions import MlflowException, RestException

    from raven.record.sweep_tracker import SweepTracker
    from raven.record.tracking import failure_kind

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pending = tmp_path / "mlflow_pending.json"
    lines: list[str] = []
    tracker = SweepTracker(uri, "exp", "sweep", pending_path=pending, log=lines.append)
    tracker.start_parent({"search.param": "sigma_aug"})
    flaky = FlakyClient(tracker.client)
    tracker._client = flaky
    trial = {"op": "trial", "trial_id": "t1", "run_name": "sigma_aug=0.01 [t1]", "params": {"sigma_aug": 0.01},
             "reopen": True}

    def epoch(n: int) -> dict:
        return {"op": "epoch", "trial_id": "t1", "epoch": n, "metrics": {"train_loss": 10.0 - n, "val_elbo": -n}}

    assert tracker.queue.submit(trial) and tracker.queue.submit(epoch(1)) and not pending.exists()
    flaky.lose_next_answer = True
    assert not tracker.queue.submit(epoch(2))  # logged, but the driver cannot know
    flaky.down = True
    for op in (epoch(3), {"op": "node", "trial_id": "t1", "node_id": "n1"},
               {"op": "tags", "trial_id": "t1", "tags": {"raven.trial_status": "TERMINATED"}},
               {"op": "finish", "trial_id": "t1", "status": "FINISHED"}):
        started = time.monotonic()
        assert not tracker.queue.submit(op)
        assert time.monotonic() - started < 1.0  # within the backoff: queued, not tried
    saved = json.loads(pending.read_text())
    assert [op["op"] for op in saved] == ["epoch", "epoch", "node", "tags", "finish"]
    assert any("unreachable" in line for line in lines)

    # The driver dies here; a new one (--resume) replays the saved writes once the store is back.
    again = SweepTracker(uri, "exp", "sweep", pending_path=pending, log=lines.append)
    assert again.queue.load_pending() == 5
    assert again.queue.drain(timeout=10) and not pending.exists()
    # The old driver's queue, delivered too, changes nothing (every write is idempotent).
    flaky.down = False
    assert tracker.queue.drain(timeout=10)

    client = again.client
    run_id = again.trial_runs()["t1"]
    for name in ("epoch", "train_loss", "val_elbo"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3], name
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["raven.node_ids"] == "n1" and run.data.tags["raven.trial_status"] == "TERMINATED"
    assert run.data.params["sigma_aug"] == "0.01"
    assert len(again.trial_runs()) == 1

    # What is retried and what is not.
    assert failure_kind(MlflowException("API request to http://h/api failed with exception Max retries")) == "unreachable"
    assert failure_kind(RestException({"error_code": "INTERNAL_ERROR", "message": "db down"})) == "server"
    assert failure_kind(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"})) is None
    assert failure_kind(MlflowException("a bug")) is None


def test_while_the_store_is_down_reads_are_skipped_at_once_and_only_the_drain_waits(tmp_path):
    from raven.record.sweep_tracker import SweepTracker, sweep_tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    tracker = SweepTracker(uri, "exp", "sweep", pending_path=tmp_path / "mlflow_pending.json", log=lines.append)
    tracker.start_parent({"search.param": "sigma_aug"})
    # Tune's restored callback unpickles the tracker: in the driver's process it is the driver's (one queue).
    assert pickle.loads(pickle.dumps(tracker)) is tracker
    flaky = FlakyClient(tracker.client)
    tracker._client = flaky
    queue = tracker.queue
    assert queue.read("reading the trial runs", tracker.trial_runs, None) == {} and not queue.down

    flaky.down = True
    started = time.monotonic()
    assert queue.read("reading the trial runs", tracker.trial_runs, None) is None  # one try, no wait
    assert queue.down
    assert not queue.submit({"op": "trial", "trial_id": "t1", "run_name": "t1", "params": {"sigma_aug": 0.1}})
    for _ in range(5):  # later reads neither wait nor go to the store
        assert queue.read("reading the trial runs", tracker.trial_runs, "skipped") == "skipped"
    assert time.monotonic() - started < 2.0
    assert sum("reading the trial runs skipped" in line for line in lines) == 1
    started = time.monotonic()
    assert not queue.drain(1.0) and 0.9 <= time.monotonic() - started < 3.0  # the one wait, bounded
    assert queue.pending == 1 and json.loads((tmp_path / "mlflow_pending.json").read_text())[0]["trial_id"] == "t1"

    flaky.down = False  # back: the queued write goes first, then the read sees it
    assert sweep_tracker(uri, "exp", "sweep") is tracker
    started = time.monotonic()
    assert queue.drain(30.0) and time.monotonic() - started < 20.0
    assert not queue.down and list(queue.read("reading the trial runs", tracker.trial_runs, {})) == ["t1"]
    assert any("reachable again" in line for line in lines)


# ----------------------------------------------------------------------------- (c) tracking server outage


@pytest.mark.slow
def test_tracking_server_outage_loses_and_duplicates_nothing(cluster, tmp_path):
    from mlflow import MlflowClient

    cluster.ensure_workers(2)
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", env=cluster.env,
                          log_path=tmp_path / "mlflow-server.log")
    server.start()
    epochs, trials = 3, 2
    driver = None
    try:
        driver = Driver(sweep_args(cluster, tmp_path, "outage", epochs, trials, 2, tracking_uri=server.uri),
                        cluster.env, tmp_path, tmp_path / "driver.log")
        wait_for(lambda: re.search(r"trial \w+ epoch 1/", driver.output) or driver.proc.poll() is not None,
                 240, 0.05, "the first epoch")
        assert driver.proc.poll() is None, driver.output[-5000:]
        server.stop(kill=True)  # a crash: no graceful shutdown
        down_at = time.monotonic()
        pending = tmp_path / "ray_results" / "outage" / "mlflow_pending.json"
        queued = False
        while time.monotonic() - down_at < 10:
            queued = queued or pending.is_file()
            time.sleep(0.1)
        server.start()  # the same port and store
        print(f"MLflow server down for {time.monotonic() - down_at:.0f}s")
        rc = driver.wait(300)
        output = driver.output
        print(f"sweep with a tracking outage: {driver.seconds:.0f}s")
        assert rc == 0, output[-6000:]
        assert "unreachable" in output and "queued and retried" in output, output[-6000:]
        assert "reachable again" in output and "dropped" not in output, output[-6000:]
        assert queued, "no write was queued during the outage (it ended before the trials reported?)"
        assert not pending.exists()  # everything delivered

        client = MlflowClient(server.uri)
        trial_ids = tune_trials(tmp_path / "ray_results" / "outage")
        assert len(trial_ids) == trials
        parent, _ = assert_one_run_per_trial(client, EXPERIMENT, trial_ids, epochs)
        assert parent.info.status == "FINISHED"
        assert "best_val_robust_accuracy" in parent.data.metrics
        assert {"trials.csv", "optimization_history.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    finally:
        if driver is not None:
            driver.stop()
        server.stop()


# ----------------------------------------------------------------------------- (d) the tracking server stays away


class Timeline:
    """When each complete line of a driver's output first appeared (the test polls while it runs)."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.lines: list[tuple[float, str]] = []

    def poll(self) -> None:
        text = self.driver.output
        for line in text[:text.rfind("\n") + 1].splitlines()[len(self.lines):]:
            self.lines.append((time.monotonic(), line))

    def first(self, pattern: str) -> float:
        return next(t for t, line in self.lines if re.search(pattern, line))

    def last(self, pattern: str) -> float:
        return max(t for t, line in self.lines if re.search(pattern, line))


@pytest.mark.slow
def test_tracking_server_away_past_the_end_waits_once_and_resume_completes_the_record(tmp_path, data_dir):
    """The server is killed after the first epoch and stays away past the end of the sweep.

    The driver trains, evaluates the best trial and closes the record from what it holds, waits
    once (--tracking-wait) and ends with one line naming the store, the writes kept, their file
    and the --resume that replays them. Once the server is back, that command replays them
    without training or evaluating anything again, and the record is complete.
    """
    from mlflow import MlflowClient

    wait_s, epochs, trials = 15, 3, 2
    ray_tmp = short_tmpdir()
    env = base_env(data_dir, ray_tmp)
    env["RAY_TMPDIR"] = str(ray_tmp)  # the sweep's own local Ray
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", env=env,
                          log_path=tmp_path / "mlflow-server.log")
    storage = tmp_path / "ray_results"
    args = [*LEAN_SWEEP_FLAGS, "--num-samples", str(trials), "--epochs", str(epochs), "--evaluate-top", "1",
            "--eval-limit", "100", "--eval-steps", "2", "--no-tsne", "--tracking-uri", "URI",
            "--tracking-wait", str(wait_s), "--name", "away", "--storage-path", str(storage)]
    driver = None
    try:
        server.start()
        args[args.index("URI")] = server.uri
        driver = Driver(args, env, tmp_path, tmp_path / "driver.log")
        timeline = Timeline(driver)
        while not any(re.search(r"trial \w+ epoch 1/", line) for _, line in timeline.lines):
            assert driver.proc.poll() is None and driver.seconds < 300, driver.output[-5000:]
            timeline.poll()
            time.sleep(0.05)
        server.stop(kill=True)
        down_at = time.monotonic()
        while driver.proc.poll() is None:
            assert time.monotonic() - down_at < 600, driver.output[-5000:]
            timeline.poll()
            time.sleep(0.1)
        ended_at = time.monotonic()
        timeline.poll()
        driver.stop()
        output = driver.output
        assert driver.proc.returncode == 75, output[-6000:]
        # The driver's own lines: Ray prints its workers' lines prefixed "(task pid=N)", and a trial actor
        # that Ray stops at the end of the search may print its SIGTERM's "Exception ignored" traceback.
        driver_lines = [line for line in output.splitlines() if "pid=" not in line.split(")")[0]]
        assert not any("Traceback" in line for line in driver_lines), output[-6000:]
        assert "its MLflow record queued" in output  # the best trial was evaluated during the outage

        # One wait, at the end: after the store went away, the sweep took its own work (the epochs left,
        # the evaluation task, and at most ~30 s for Tune's end, the plots, Ray's shutdown and the failed
        # tries at the store) plus at most one --tracking-wait.
        waited_from = timeline.first(rf"waiting up to {wait_s}s for the MLflow tracking store")
        training = timeline.last(r"trial \w+ (epoch \d+/|finished)") - down_at
        evaluation = timeline.last(r"evaluated trial") - timeline.first(r"evaluating trial")
        after = ended_at - down_at
        print(f"after the store went away: {after:.0f}s (training {training:.0f}s, evaluation {evaluation:.0f}s, "
              f"the final wait {ended_at - waited_from:.0f}s of at most {wait_s}s)")
        assert ended_at - waited_from <= wait_s + 10
        assert after <= wait_s + training + evaluation + 30, output[-6000:]

        # The last line, and the only one of its kind.
        pending = storage / "away" / "mlflow_pending.json"
        last = output.strip().splitlines()[-1]
        found = re.fullmatch(r"raven sweep: MLflow tracking store (\S+) unreachable: (\d+) write\(s\) kept in "
                             r"(\S+); once it is back, replay them with: (python .+)", last)
        assert found, output[-3000:]
        assert found.group(1) == server.uri and Path(found.group(3)) == pending
        assert int(found.group(2)) == len(json.loads(pending.read_text())) > 0
        assert output.count("write(s) kept in") == 1
        command = shlex.split(found.group(4))
        assert command[1:] == [str(SIGMA_SCRIPT), "--resume", "--name", "away", "--storage-path", str(storage)]

        server.start()  # back, on the same port and store
        resumed = subprocess.run([sys.executable, *command[1:]], env=env, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=300, start_new_session=True)
        replay = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, replay[-6000:]
        assert "had finished its work; replaying" in replay and "record of sweep away is complete" in replay
        assert not re.search(r"trial \w+ epoch|evaluating trial|Ray cluster", replay), replay[-3000:]
        assert not pending.exists()

        # Complete: every trial with every epoch once, the evaluation, the registered model.
        client = MlflowClient(server.uri)
        trial_ids = tune_trials(storage / "away")
        assert len(trial_ids) == trials
        parent, runs = assert_one_run_per_trial(client, EXPERIMENT, trial_ids, epochs)
        assert parent.info.status == "FINISHED"
        assert {"best_val_robust_accuracy", "best_test_clean_accuracy"} <= set(parent.data.metrics)
        assert {"trials.csv", "optimization_history.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
        exp = client.get_experiment_by_name(EXPERIMENT)
        (evaluation_run,) = client.search_runs([exp.experiment_id], "tags.`raven.role` = 'evaluation'")
        assert evaluation_run.info.status == "FINISHED"
        trial_run = next(r for r in runs if r.data.tags["raven.trial_id"] == evaluation_run.data.tags["raven.trial_id"])
        assert trial_run.data.tags["raven.evaluation_run_id"] == evaluation_run.info.run_id
        clean = float(re.search(r"evaluated trial \w+ .* clean ([\d.]+)", output).group(1))
        assert evaluation_run.data.metrics["clean_accuracy"] == pytest.approx(clean, abs=1e-4)  # replayed, not redone
        assert "checkpoint/checkpoint.pt" in {a.path for a in client.list_artifacts(evaluation_run.info.run_id,
                                                                                     "checkpoint")}
        assert evaluation_run.data.tags["raven.model_uri"].startswith("models:/")
        name, version = parent.data.tags["raven.registered_model"].split("/")
        assert name == "raven-mnist-raven"
        assert client.get_model_version(name, version).run_id == evaluation_run.info.run_id
    finally:
        if driver is not None:
            driver.stop()
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- (b) the driver killed


@pytest.mark.slow
def test_killed_driver_is_resumed_without_repeating_or_losing_anything(cluster, tmp_path):
    """SIGKILL the driver while the second of two trials (one at a time) has checkpointed its first epoch.

    Tune's experiment state is saved only at the start and when a trial has checkpointed twice
    here (TUNE_GLOBAL_CHECKPOINT_S=1000), so the saved state still shows the first trial
    running (at its last checkpoint) and does not know the second: --resume re-reports the
    first from its final checkpoint without training, runs a new trial in place of the second,
    and deletes the lost trial's MLflow run. (Where a later Tune saves the second trial too, it
    resumes from its checkpoint instead; the record checks below hold either way.)
    """
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    cluster.ensure_workers(2)
    epochs, trials = 2, 2
    env = dict(cluster.env, TUNE_GLOBAL_CHECKPOINT_S="1000")
    args = sweep_args(cluster, tmp_path, "killed", epochs, trials, 1)
    driver = Driver(args, env, tmp_path, tmp_path / "driver.log")
    experiment_dir = tmp_path / "ray_results" / "killed"

    def second_trial_checkpointed():
        started = re.findall(r"trial (\w+) epoch 1/", driver.output)
        if driver.proc.poll() is not None:
            return True
        if len(set(started)) < 2:
            return False
        return bool(checkpoint_reports(experiment_dir / f"trial_{started[-1]}")) and started[-1]

    try:
        second = wait_for(second_trial_checkpointed, 240, 0.05, "the second trial's first checkpoint")
        assert second is not True, f"the sweep ended first:\n{driver.output[-5000:]}"
        kill_session(driver.proc.pid)  # nothing graceful
        assert driver.proc.wait(10) == -9
    finally:
        driver.stop()
    killed_output = driver.output
    first = re.search(r"trial (\w+) finished", killed_output).group(1)

    resumed = Driver(["--resume", "--name", "killed", "--storage-path", str(tmp_path / "ray_results"),
                      "--address", cluster.address], env, tmp_path, tmp_path / "resumed.log")
    try:
        rc = resumed.wait(300)
    finally:
        resumed.stop()
    output = resumed.output
    lost = f"trial {second} started after Tune last saved" in output
    print(f"resumed sweep after a killed driver: {resumed.seconds:.0f}s "
          f"({'the second trial was lost and replaced' if lost else 'the second trial resumed'})")
    assert rc == 0, output[-6000:]
    assert "continuing sweep killed" in output

    trial_ids = tune_trials(experiment_dir)
    assert len(trial_ids) == trials and first in trial_ids
    assert (second not in trial_ids) == lost
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, runs = assert_one_run_per_trial(client, EXPERIMENT, trial_ids, epochs)
    assert parent.info.status == "FINISHED"
    if lost:
        exp = client.get_experiment_by_name(EXPERIMENT)
        deleted = client.search_runs([exp.experiment_id], f"tags.`raven.trial_id` = '{second}'",
                                     run_view_type=ViewType.DELETED_ONLY)
        assert len(deleted) == 1
    # Nothing was trained twice: an epoch reported by both drivers can only be a trial's last,
    # re-reported (not trained) by a trial restored from its final checkpoint.
    for trial_id in trial_ids:
        again = set(epoch_lines(killed_output, trial_id)) & set(epoch_lines(output, trial_id))
        assert again <= {epochs}, (trial_id, sorted(again))
        assert len(epoch_lines(output, trial_id)) == len(set(epoch_lines(output, trial_id)))


# ----------------------------------------------------------------------------- (a) a worker node lost


@pytest.mark.slow
def test_lost_worker_node_trial_restarts_from_checkpoint_on_another_node(cluster, tmp_path):
    from mlflow import MlflowClient

    cluster.ensure_workers(2)
    epochs, trials = 5, 2
    driver = Driver(sweep_args(cluster, tmp_path, "lost-node", epochs, trials, 2), cluster.env, tmp_path,
                    tmp_path / "driver.log")
    experiment_dir = tmp_path / "ray_results" / "lost-node"
    workers = {n.node_id for n in cluster.workers if n.alive()}

    def running_on_a_worker():
        # A trial with a checkpoint of epoch >= 1 stored and epochs still to go, on a worker node, whose
        # report the driver has processed: a checkpoint folder seen in storage before that may still be
        # half copied when the node dies (CI once killed it there, and the trial rightly began again).
        for trial_dir in experiment_dir.glob("trial_*"):
            history = checkpoint_reports(trial_dir)
            trial_id = trial_dir.name.removeprefix("trial_")
            if (history and len(history) < epochs - 1 and history[-1].get("node_id") in workers
                    and len(history) in epoch_lines(driver.output, trial_id)):
                return trial_id, history[-1]["node_id"], len(history)
        return driver.proc.poll() is not None

    try:
        found = wait_for(running_on_a_worker, 240, 0.05, "a trial's first checkpoint")
        assert found is not True, f"the sweep ended first:\n{driver.output[-5000:]}"
        victim_trial, victim_node, at_epoch = found
        cluster.kill_node(cluster.node_by_id(victim_node))
        killed_at = time.monotonic()
        rc = driver.wait(300)
    finally:
        driver.stop()
    output = driver.output
    print(f"sweep with a lost node (killed at epoch {at_epoch} of trial {victim_trial}): {driver.seconds:.0f}s, "
          f"{time.monotonic() - killed_at:.0f}s after the kill")
    assert rc == 0, output[-6000:]
    # Tune saw the failure and restarted the trial, which went on from its checkpoint, not from scratch.
    failure = re.search(rf"trial {victim_trial} failed \(failure 1; .*\); it restarts from .*", output)
    assert failure, output[-6000:]
    seen = epoch_lines(output, victim_trial)
    assert len(seen) == len(set(seen)), f"an epoch of trial {victim_trial} was trained twice: {seen}"
    after = epoch_lines(output[failure.end():], victim_trial)
    assert after and after[0] > at_epoch, (at_epoch, after)

    trial_ids = tune_trials(experiment_dir)
    assert len(trial_ids) == trials and victim_trial in trial_ids
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, runs = assert_one_run_per_trial(client, EXPERIMENT, trial_ids, epochs)
    assert parent.info.status == "FINISHED"
    victim = next(r for r in runs if r.data.tags["raven.trial_id"] == victim_trial)
    nodes = victim.data.tags["raven.node_ids"].split(",")
    assert nodes[0] == victim_node and len(nodes) == 2 and nodes[1] in workers - {victim_node}, (nodes, victim_node)
    assert victim.data.tags["raven.trial_restarts"] == "1"
