"""Sweeps (raven.sweep.driver, raven.record.tracking, sweeps/*.py): flags, the objective, the MLflow record, a Ray head, --resume.

The end-to-end tests run the entry scripts as a user would (subprocesses, `--smoke`), in a
temporary working folder with the local defaults (sqlite:///mlflow.db, ./mlruns,
./ray_results), and read the result back through MlflowClient and the Tune folder.

Ray's token authentication stays on throughout: each test writes its own token into its
temporary folder and points RAY_AUTH_TOKEN_PATH at it (RAY_AUTH_MODE=token), so nothing
reads or writes ~/.ray/auth_token. Every Ray and MLflow process a test starts runs in its
own session (start_new_session) and is stopped by that session id, never by name.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Ports, process sessions and the token environment are shared with the multi-node, tracking
# server and fault tests (tests/ray_cluster.py).
from ray_cluster import (
    LEAN_SWEEP_FLAGS,
    _zombie,
    base_env,
    free_port,
    free_port_range,
    load_logged_model,
    session_members,
    short_tmpdir,
    stop_session,
)

REPO = Path(__file__).resolve().parents[1]
SIGMA_SCRIPT = REPO / "sweeps" / "sigma_aug.py"
ETA_SCRIPT = REPO / "sweeps" / "se_eta.py"
TC_BETA_SCRIPT = REPO / "sweeps" / "tc_beta.py"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def short_tmp():
    """A short /tmp folder (Ray's Unix socket paths must stay under 108 characters)."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mlflow_runs(db: Path, experiment: str):
    """{role: [runs]} of the experiment in the SQLite store at `db`."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {db}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get("raven.role"), []).append(run)
    return client, exp, by_role


def check_sweep_record(db: Path, experiment: str, n_trials: int, epochs: int, param: str, method: str = "raven"):
    """The parent, one child per trial with each epoch logged once, an evaluation child with everything."""
    client, exp, by_role = mlflow_runs(db, experiment)
    assert len(by_role.get("sweep", [])) == 1, by_role.keys()
    parent = by_role["sweep"][0]
    assert parent.info.status == "FINISHED"
    assert "best_val_robust_accuracy" in parent.data.metrics
    assert {"search.space.low", "budget.num_samples", "code_version"} <= set(parent.data.params) or \
        {"search.space.values", "budget.num_samples", "code_version"} <= set(parent.data.params)
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "optimization_history.png"} <= parent_artifacts

    trials = by_role.get("trial", [])
    trial_ids = [r.data.tags["raven.trial_id"] for r in trials]
    assert len(trials) == n_trials and len(set(trial_ids)) == n_trials, trial_ids
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["raven.parent_sweep"] == parent.data.tags["raven.sweep_name"]
        assert run.info.status == "FINISHED"
        assert param in run.data.params and "seed" in run.data.params
        if "search.space.low" in parent.data.params:  # log-uniform: the log axis MLflow's linear charts lack
            assert float(run.data.params[f"log10_{param}"]) == pytest.approx(
                math.log10(float(run.data.params[param])), abs=1e-6)
        else:
            assert f"log10_{param}" not in run.data.params
        assert run.data.tags.get("raven.checkpoint")
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))
        assert steps == list(range(1, epochs + 1)), (run.info.run_name, steps)
        for name in ("train_loss", "val_elbo"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == steps
        objective = client.get_metric_history(run.info.run_id, "val_robust_accuracy")
        assert [m.step for m in objective] == [epochs]
        assert 0.0 <= objective[0].value <= 1.0

    evaluations = by_role.get("evaluation", [])
    assert len(evaluations) == 1
    ev = evaluations[0]
    assert ev.info.status == "FINISHED"
    assert ev.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert ev.data.tags["raven.trial_id"] in trial_ids
    trial_run = next(r for r in trials if r.data.tags["raven.trial_id"] == ev.data.tags["raven.trial_id"])
    assert trial_run.data.tags["raven.evaluation_run_id"] == ev.info.run_id
    assert ev.data.tags["raven.trial_run_id"] == trial_run.info.run_id
    metrics = ev.data.metrics
    # The run spans the evaluation itself (it once read 0.8 s: the time its record took to write).
    assert (ev.info.end_time - ev.info.start_time) / 1000 == pytest.approx(metrics["eval_seconds"], abs=0.002)
    for name in ("clean_accuracy", "mse_255", "latent_pair_distance_mean", "adv_acc_kl_delta_0.1",
                 "adv_acc_w2_delta_0.2", "adv_acc_kl_delta_0", "adv_acc_w2_delta_0.1"):
        assert name in metrics and math.isfinite(metrics[name]), name
    pngs = {a.path for a in client.list_artifacts(ev.info.run_id, "robustness") if a.path.endswith(".png")}
    assert {"robustness/reconstructions.png", "robustness/robustness_curves.png", "robustness/tsne.png"} <= pngs
    model = load_logged_model(f"sqlite:///{db}", ev.data.tags["raven.model_uri"])
    mu, _ = model.encode(torch.zeros(2, 784))
    assert mu.shape == (2, 10)
    check_lineage(client, exp, parent, trials, [ev], method)
    return client, parent, trials, ev


def check_lineage(client, exp, parent, trials, evaluations, method: str = "raven"):
    """The experiment opens on its runs, every run names its data, the study and the registered model exist."""
    import optuna

    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for run in trials:
        inputs = {d.dataset.name: (d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"mnist-train", "mnist-validation"}, inputs
        assert inputs["mnist-validation"][1] == "validation" and len(inputs["mnist-train"][0]) == 16
    for ev in evaluations:
        assert {d.dataset.name for d in ev.inputs.dataset_inputs} == {"mnist-train", "mnist-test"}
    # The Optuna study beside the sweep holds one COMPLETE trial per configuration, tied to its Tune trial.
    study = optuna.load_study(study_name=parent.data.tags["raven.optuna_study"],
                              storage=parent.data.tags["raven.optuna_storage"])
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_tune) == sorted(r.data.tags["raven.trial_id"] for r in trials)
    for run in trials:
        trial = by_tune[run.data.tags["raven.trial_id"]]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.values[0] == pytest.approx(run.data.metrics["val_robust_accuracy"])
    # The best evaluated model is registered as raven-{dataset}-{method}, its version naming sweep and trial.
    name, version = parent.data.tags["raven.registered_model"].split("/")
    registered = client.get_model_version(name, version)
    best = evaluations[0]
    assert name == f"raven-mnist-{method}" and registered.run_id in {e.info.run_id for e in evaluations}
    assert registered.tags["raven.sweep_name"] == parent.data.tags["raven.sweep_name"]
    assert registered.tags["raven.trial_id"] == client.get_run(registered.run_id).data.tags["raven.trial_id"]
    assert best.data.tags["raven.model_uri"].startswith("models:/")


# ----------------------------------------------------------------------------- bad flags


def _bad_flag_cases(tmp: Path) -> list[tuple[Path, list[str], dict[str, str], str]]:
    dead = f"127.0.0.1:{free_port()}"
    return [
        (SIGMA_SCRIPT, ["--sigma-min", "0.5", "--sigma-max", "0.1"], {}, "sigma_aug range"),
        (SIGMA_SCRIPT, ["--num-samples", "-3"], {}, "--num-samples"),
        (SIGMA_SCRIPT, ["--epochs", "0", "--smoke"], {}, "--epochs"),
        (SIGMA_SCRIPT, ["--dataset", "cifar10"], {}, "invalid choice"),
        (SIGMA_SCRIPT, ["--objective", "autoattack"], {}, "invalid choice"),
        (SIGMA_SCRIPT, ["--address", dead], {}, "cannot reach a Ray cluster"),
        (SIGMA_SCRIPT, ["--address", "auto"], {"RAY_ADDRESS": dead}, "cannot reach a Ray cluster"),
        (ETA_SCRIPT, ["--eta-min", "100", "--eta-max", "10"], {}, "eta range"),
        (ETA_SCRIPT, ["--eta-values", "1,x"], {}, "expected comma-separated numbers"),
        (ETA_SCRIPT, ["--eta-values", "1,3", "--eta-grid"], {}, "two grids"),
        (ETA_SCRIPT, ["--resume", "--storage-path", str(tmp / "nothing")], {}, "to resume"),
        (TC_BETA_SCRIPT, ["--tc-beta-min", "20", "--tc-beta-max", "1"], {}, "tc_beta range must satisfy 0 < low < high"),
    ]


def test_bad_flags_fail_at_once_in_one_line(tmp_path, data_dir):
    env = base_env(data_dir, tmp_path)
    cases = _bad_flag_cases(tmp_path)
    started = time.monotonic()
    # All at once: each pays only its imports (seconds), none may start Ray or wait for a cluster.
    procs = [subprocess.Popen([sys.executable, str(script), *flags], env={**env, **extra}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, flags, extra, _ in cases]
    for (script, flags, _, expected), proc in zip(cases, procs):
        stdout, stderr = proc.communicate(timeout=180)
        lines = [line for line in stderr.splitlines() if line.strip()]
        where = f"{script.name} {' '.join(flags)}: rc {proc.returncode}, stderr {stderr!r}"
        assert proc.returncode == 2, where
        assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], where
        assert "Traceback" not in stderr and stdout == "", where
    seconds = time.monotonic() - started
    assert seconds < 20 * len(cases), f"{len(cases)} bad commands took {seconds:.0f}s"
    # Nothing was started or written.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    assert not (tmp_path / "mlruns").exists()


# ----------------------------------------------------------------------------- units


def test_validation_objective_reads_no_test_image(mnist_small):
    from raven.config import TrainConfig
    from raven.data import DataSplits
    from raven.sweep.selection import OBJECTIVE, ObjectiveSettings, validation_objective
    from raven.train import build_model

    poisoned = DataSplits(mnist_small.train_x, mnist_small.train_y, mnist_small.val_x, mnist_small.val_y,
                          torch.full((10, 784), float("nan")), torch.full((10,), -1, dtype=torch.long))
    settings = ObjectiveSettings(val_limit=100, steps=2, probe_limit=500)
    metrics = validation_objective(build_model(TrainConfig()), poisoned, settings)
    parts = [v for k, v in metrics.items() if k.startswith("val_adv_acc_")]
    assert len(parts) == 2 * 3  # kl and w2 at delta 0.05, 0.1, 0.2
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in metrics.values())
    assert metrics[OBJECTIVE] == pytest.approx(sum(parts) / len(parts))


def test_tracker_finds_its_runs_again_and_logs_each_epoch_once(tmp_path):
    from raven.record.sweep_tracker import SweepTracker
    from raven.record.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    tracker = SweepTracker(uri, "exp", "sweep-a")
    parent, created = tracker.start_parent({"search.param": "sigma_aug"})
    assert created
    run = tracker.trial_run("t1", "sigma_aug=0.01 [t1]", {"sigma_aug": 0.01})
    assert tracker.log_epoch(run, 1, {"train_loss": 3.0})
    assert not tracker.log_epoch(run, 1, {"train_loss": 3.0})
    tracker.finish(run)
    # A new driver (--resume) finds the same parent and child and skips the logged epoch.
    again = SweepTracker(uri, "exp", "sweep-a")
    assert again.start_parent({"search.param": "sigma_aug"}) == (parent, False)
    assert again.trial_run("t1", "other name", {"sigma_aug": 0.01}) == run
    assert again.client.get_run(run).info.status == "FINISHED"  # found, not reopened
    assert again.trial_run("t1", reopen=True) == run
    assert not again.log_epoch(run, 1, {"train_loss": 3.0})
    assert again.log_epoch(run, 2, {"train_loss": 2.0})
    assert [m.step for m in again.client.get_metric_history(run, "train_loss")] == [1, 2]
    # An unfinished evaluation run is replaced, a finished one reused.
    first = again.new_evaluation_run("t1", "eval", {"sigma_aug": 0.01})
    second = again.new_evaluation_run("t1", "eval", {"sigma_aug": 0.01})
    assert second != first and again.evaluation_run("t1") == (second, "RUNNING")
    again.finish(second)
    assert again.new_evaluation_run("t1", "eval", {"sigma_aug": 0.01}) == second
    assert again.client.get_run(run).data.tags["raven.evaluation_run_id"] == second
    assert SweepTracker(uri, "exp", "sweep-b").find_parent() is None


# ----------------------------------------------------------------------------- a Ray head


@pytest.fixture(scope="module")
def ray_head(data_dir):
    """A Ray head started with `ray start --head` on free ports, token auth on, in its own session."""
    short_tmp = short_tmpdir()
    env = base_env(data_dir, short_tmp)
    port = free_port()
    workers = free_port_range(40)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(port),
           "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
           "--min-worker-port", str(workers), "--max-worker-port", str(workers + 39),
           "--include-dashboard", "false", "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--temp-dir", str(short_tmp / "ray"),
           "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output[-3000:]
        yield {"address": f"127.0.0.1:{port}", "port": port, "env": env, "tmp": short_tmp}
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_session(proc.pid)  # the head's processes share the session of `ray start`
        shutil.rmtree(short_tmp, ignore_errors=True)
        assert not [p for p in session_members(proc.pid) if not _zombie(p)]


@pytest.mark.slow
def test_smoke_sweep_on_a_ray_head(ray_head, tmp_path):
    """The main usage line against a token-authenticated `ray start --head`: RAY_ADDRESS with --address auto.

    As a user's shell has it: the token in RAY_AUTH_TOKEN_PATH and RAY_AUTH_MODE unset. Ray reads
    `auto` with RAY_ADDRESS set as an explicit address and does not switch token mode on for it
    by itself (the driver used to be refused with InvalidAuthToken); raven.sweep.cluster.connect does.
    """
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_MODE"}
    env["RAY_ADDRESS"] = ray_head["address"]
    # Token authentication is on: a client without the token is turned away.
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    anonymous["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto')"], env=anonymous,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout[-2000:]

    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SIGMA_SCRIPT), "--address", "auto", "--smoke"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=480)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "InvalidAuthToken" not in proc.stderr
    assert "Best configuration: raven sigma_aug=" in proc.stdout
    assert "Test-set evaluation of the best configuration" in proc.stdout
    assert re.search(r"estimated time: ~\d+ (s|min)", proc.stderr) and re.search(r"; ~\d+ (s|min) left", proc.stderr)
    # The evaluation task's own stages reach the console (through Ray), so an hour-long evaluation shows progress.
    assert re.search(r"raven sweep: \[raven sigma_aug=.+\] .*probe on \d+ training images", proc.stderr), \
        proc.stderr[-3000:]
    assert re.search(r"raven sweep: \[raven sigma_aug=.+\] +paper kl delta=", proc.stderr), proc.stderr[-3000:]
    print(f"sigma_aug --smoke on a Ray head: {seconds:.0f}s")

    _, parent, trials, _ = check_sweep_record(tmp_path / "mlflow.db", "raven-sigma-aug", 2, 1, "sigma_aug")
    # The trials ran on this head, not on a Ray started by the script.
    assert parent.data.tags["raven.ray_cluster"].endswith(f":{ray_head['port']}")
    assert (tmp_path / "mlruns").is_dir()
    sweep_dirs = [p for p in (tmp_path / "ray_results").iterdir() if p.is_dir()]
    assert len(sweep_dirs) == 1 and (sweep_dirs[0] / "raven_sweep.json").is_file()
    for run in trials:
        assert (sweep_dirs[0] / f"trial_{run.data.tags['raven.trial_id']}").is_dir()
    assert (sweep_dirs[0] / "optuna.db").is_file()  # the study beside the sweep


@pytest.mark.slow
def test_multi_objective_sweep_on_an_explicit_head_address(ray_head, tmp_path):
    """HOST:PORT with the token and RAY_AUTH_MODE unset; two objectives: the Pareto front is logged and evaluated."""
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([sys.executable, str(SIGMA_SCRIPT), "--address", ray_head["address"], *LEAN_SWEEP_FLAGS,
                           "--num-samples", "3", "--objectives", "val_robust_accuracy:max,val_elbo:max",
                           "--evaluate-top", "2", "--eval-limit", "100", "--eval-steps", "2", "--no-tsne",
                           "--name", "pareto"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "InvalidAuthToken" not in proc.stderr and "Pareto front (val_robust_accuracy:max, val_elbo:max)" in proc.stdout
    client, exp, by_role = mlflow_runs(tmp_path / "mlflow.db", "raven-sigma-aug")
    (parent,), trials = by_role["sweep"], by_role["trial"]
    assert parent.data.tags["raven.ray_cluster"].endswith(f":{ray_head['port']}")
    # The front, by brute force over the trials' last results (no configuration better in both objectives).
    points = {float(r.data.params["sigma_aug"]): (r.data.metrics["val_robust_accuracy"], r.data.metrics["val_elbo"])
              for r in trials}
    front = [v for v, (a, e) in points.items()
             if not any(a2 >= a and e2 >= e and (a2, e2) != (a, e) for a2, e2 in points.values())]
    front.sort(key=lambda v: -points[v][0])
    assert parent.data.metrics["pareto_front_size"] == len(front)
    evaluated = sorted(float(r.data.params["sigma_aug"]) for r in by_role["evaluation"])
    assert evaluated == sorted(front[:2])
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto_front.json",
                                                      str(tmp_path / "dl"))).read_text())
    assert table["columns"][0] == "sigma_aug"
    assert sorted(row[0] for row in table["data"]) == pytest.approx(sorted(front))
    assert {"pareto_front.csv", "pareto_front.png", "optimization_history.png"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id)}
    check_lineage(client, exp, parent, trials, by_role["evaluation"])


@pytest.mark.slow
def test_tc_beta_smoke_sweep_records_beta_tcvae_trials_and_their_evaluation(ray_head, tmp_path):
    """The third searched parameter is one entry script: beta-TCVAE's tc_beta through Tune into MLflow."""
    proc = subprocess.run([sys.executable, str(TC_BETA_SCRIPT), "--address", ray_head["address"], "--smoke"],
                          env=ray_head["env"], cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "Best configuration: beta-tcvae tc_beta=" in proc.stdout
    assert "tc_beta log-uniform in [1, 20]" in proc.stderr

    _, parent, trials, ev = check_sweep_record(tmp_path / "mlflow.db", "raven-tc-beta", 2, 1, "tc_beta", "beta-tcvae")
    assert parent.data.params["search.param"] == "tc_beta" and parent.data.params["method"] == "beta-tcvae"
    assert (parent.data.params["search.space.low"], parent.data.params["search.space.high"]) == ("1.0", "20.0")
    assert "search.space.paper" not in parent.data.params  # the paper has no tc_beta; nor eta's values
    # The two smoke trials are the initial points: the VAE (tc_beta = 1) and the range's geometric middle.
    assert sorted(float(r.data.params["tc_beta"]) for r in trials) == pytest.approx([1.0, math.sqrt(20)])
    for run in (*trials, ev):
        assert run.data.params["method"] == "beta-tcvae"
    assert float(ev.data.params["tc_beta"]) in {float(r.data.params["tc_beta"]) for r in trials}
    assert parent.data.metrics["best_tc_beta"] == pytest.approx(float(ev.data.params["tc_beta"]))


# ----------------------------------------------------------------------------- --resume


def _progress_rows(trial_dir: Path) -> int:
    lines = (trial_dir / "progress.csv").read_text().strip().splitlines()
    return len(lines) - 1


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating_anything(tmp_path, data_dir, short_tmp):
    env = base_env(data_dir, short_tmp)
    env["RAY_TMPDIR"] = str(short_tmp)  # this test's local Ray, invisible to address='auto' elsewhere
    cmd = [sys.executable, str(SIGMA_SCRIPT), "--smoke", "--num-samples", "2", "--epochs", "2",
           "--max-concurrent", "1", "--name", "resume-me"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    finished: list[str] = []
    interrupted_in = None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "finished: val_robust_accuracy" in line:
                finished.append(line.split("trial ")[1].split()[0])
            # The first trial is done and the second has checkpointed epoch 1 of 2: stop the driver.
            if finished and interrupted_in is None and " epoch 1/2" in line \
                    and line.split("trial ")[1].split()[0] not in finished:
                interrupted_in = line.split("trial ")[1].split()[0]
                proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_session(proc.pid)
    output = "".join(lines)
    assert interrupted_in is not None, output[-5000:]
    assert rc == 130, output[-5000:]
    assert "--resume --name resume-me" in output
    first_trial = finished[0]
    experiment_dir = tmp_path / "ray_results" / "resume-me"
    assert _progress_rows(experiment_dir / f"trial_{interrupted_in}") == 1

    resumed = subprocess.run([sys.executable, str(SIGMA_SCRIPT), "--resume"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=400, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "continuing sweep resume-me" in resumed.stderr
    # The finished trial was not run again; the interrupted one continued from epoch 1.
    assert f"trial {first_trial} epoch" not in resumed.stderr
    assert f"trial {interrupted_in} epoch 1/2" not in resumed.stderr
    assert f"trial {interrupted_in} epoch 2/2" in resumed.stderr
    assert _progress_rows(experiment_dir / f"trial_{first_trial}") == 2  # its two epochs, not repeated
    trial_dirs = sorted(p.name for p in experiment_dir.glob("trial_*"))
    assert trial_dirs == sorted([f"trial_{first_trial}", f"trial_{interrupted_in}"])

    # One parent, exactly one child per trial, every epoch metric once.
    client, parent, trials, _ = check_sweep_record(tmp_path / "mlflow.db", "raven-sigma-aug", 2, 2, "sigma_aug")
    assert parent.data.tags["raven.sweep_name"] == "resume-me"
    assert sorted(r.data.tags["raven.trial_id"] for r in trials) == sorted([first_trial, interrupted_in])
    # The resumed sweep went on with the same Optuna study (check_lineage: one COMPLETE trial per Tune trial).
    import optuna

    summaries = optuna.get_all_study_summaries(f"sqlite:///{experiment_dir / 'optuna.db'}")
    assert [(s.study_name, s.n_trials) for s in summaries] == [("resume-me", 2)]
    for run in trials:
        for name in ("train_loss", "val_elbo", "val_mse_255", "epoch"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], (run.info.run_name, name)


# ----------------------------------------------------------------------------- --seeds: packed trials


def test_a_packed_trial_resumes_from_its_newest_complete_checkpoint(tmp_path):
    """Every seed's checkpoint must load and the furthest be at the reported epoch (one that diverged stays behind)."""
    from raven.sweep.trial import REPORTED_NAME, _newest_saved_checkpoint
    from raven.train import CHECKPOINT_FORMAT

    def folder(name, reported_epochs, seed_epochs):
        path = tmp_path / name
        path.mkdir()
        (path / REPORTED_NAME).write_text(json.dumps([{"epoch": e} for e in range(1, reported_epochs + 1)]))
        for seed, epoch in seed_epochs.items():
            (path / f"seed-{seed}").mkdir()
            if epoch is not None:
                torch.save({"format": CHECKPOINT_FORMAT, "epoch": epoch}, path / f"seed-{seed}" / "checkpoint.pt")
        return path

    first = folder("checkpoint_000000", 1, {0: 1, 1: 1})
    folder("checkpoint_000001", 2, {0: 2, 1: None})  # seed 1's file not copied yet
    assert _newest_saved_checkpoint(tmp_path, 0, (0, 1)) == first
    assert _newest_saved_checkpoint(tmp_path, 1, (0, 1)) is None
    behind = folder("checkpoint_000002", 3, {0: 3, 1: 1})  # seed 1 diverged after epoch 1
    assert _newest_saved_checkpoint(tmp_path, 1, (0, 1)) == behind


def test_a_sweep_of_one_trial_per_seed_is_not_resumed_as_packed_trials(tmp_path):
    """A sweep an earlier raven ran with Tune's Repeater (a trial per seed) is refused in one line."""
    from raven.sweep.space import SearchSpace
    from raven.sweep.spec import SweepError, SweepSpec, find_resumable

    spec = SweepSpec(kind="sigma_aug", method="raven", seeds=2, name="old",
                     storage_path=str(tmp_path), space=SearchSpace.log_uniform("sigma_aug", 1e-3, 1.0))
    spec.save()
    (spec.experiment_dir / "trial_a").mkdir()
    (spec.experiment_dir / "trial_a" / "params.json").write_text(json.dumps({"sigma_aug": 0.01}))
    assert find_resumable(tmp_path, "sigma_aug", "old").seeds == 2  # a packed sweep resumes
    (spec.experiment_dir / "trial_b").mkdir()
    (spec.experiment_dir / "trial_b" / "params.json").write_text(json.dumps({"sigma_aug": 0.01, "__trial_index__": 1}))
    with pytest.raises(SweepError, match="ran each of its --seeds as its own trial"):
        find_resumable(tmp_path, "sigma_aug", "old")


@pytest.mark.slow
def test_packed_seeds_are_one_trial_that_resumes_and_evaluates_every_seed(tmp_path, data_dir, short_tmp):
    """--seeds 2: one Tune trial (one MLflow run, one Optuna trial) whose metrics are the seeds' mean,
    with their std and each seed's value; interrupted after epoch 1 and resumed, both seeds go on from
    their checkpoints; both are evaluated, each in its own run."""
    import optuna
    import pandas as pd

    from raven.config import TrainConfig
    from raven.data import load_splits
    from raven.train import load_checkpoint, load_state, train, validation_metrics

    env = base_env(data_dir, short_tmp)
    env["RAY_TMPDIR"] = str(short_tmp)
    cmd = [sys.executable, str(SIGMA_SCRIPT), *LEAN_SWEEP_FLAGS, "--seeds", "2", "--num-samples", "1", "--epochs",
           "2", "--evaluate-top", "1", "--eval-limit", "100", "--eval-steps", "2", "--no-tsne", "--name", "packed"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, trial = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if trial is None and " epoch 1/2" in line:
                trial = line.split("trial ")[1].split()[0]
                assert re.search(r"val_elbo -?[\d.]+ \+- [\d.]+", line), line  # the mean and std over the seeds
                proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_session(proc.pid)
    assert trial is not None and rc == 130, "".join(lines)[-5000:]
    resumed = subprocess.run([sys.executable, str(SIGMA_SCRIPT), "--resume"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=400, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"trial {trial} epoch 1/2" not in resumed.stderr and f"trial {trial} epoch 2/2" in resumed.stderr
    experiment_dir = tmp_path / "ray_results" / "packed"

    client, exp, by_role = mlflow_runs(tmp_path / "mlflow.db", "raven-sigma-aug")
    (run,) = by_role["trial"]
    assert run.data.params["seed"] == "0,1" and run.info.run_name.startswith("sigma_aug=0.01 seeds 0-1")
    for name in ("epoch", "epoch_seconds", "val_elbo", "val_elbo_std", "val_elbo_seed0", "val_elbo_seed1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    metrics = run.data.metrics
    per_seed = [metrics[f"val_robust_accuracy_seed{s}"] for s in (0, 1)]
    assert metrics["val_robust_accuracy"] == pytest.approx(sum(per_seed) / 2)
    assert metrics["val_robust_accuracy_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    (study_trial,) = optuna.load_study(study_name="packed", storage=f"sqlite:///{experiment_dir / 'optuna.db'}").trials
    assert study_trial.values[0] == pytest.approx(metrics["val_robust_accuracy"])  # the searcher saw the mean

    # Each seed is its solo run: the trial's final seed-S folders against train() of that seed, and the
    # logged per-seed numbers against the validation metrics recomputed from those checkpoints.
    final = Path(run.data.tags["raven.checkpoint"])
    first_epoch = client.get_metric_history(run.info.run_id, "epoch_seconds")[0].value
    splits = load_splits("mnist", data_dir, "cpu")
    for seed in (0, 1):
        model = load_checkpoint(final / f"seed-{seed}")
        assert model.config == TrainConfig(method="raven", sigma_aug=0.01, epochs=2, limit=500, seed=seed)
        # Epoch 1 was trained once, before the interruption: its timing is the one logged then.
        assert model.history[0]["epoch_seconds"] == first_epoch
        solo = train(model.config, splits=splits, device="cpu")
        for name, value in solo.model.state_dict().items():
            assert torch.allclose(value, model.state_dict()[name], atol=1e-5, rtol=0), name
        assert validation_metrics(model, model.config, splits.val_x)["val_elbo"] == \
            pytest.approx(metrics[f"val_elbo_seed{seed}"], rel=1e-6)
        assert load_state(final / f"seed-{seed}")["epoch"] == 2

    evaluations = sorted(by_role["evaluation"], key=lambda r: int(r.data.tags["raven.seed"]))
    assert [(e.data.tags["raven.trial_id"], e.data.tags["raven.seed"]) for e in evaluations] == [(trial, "0"), (trial, "1")]
    assert run.data.tags["raven.evaluation_run_id"] == ",".join(e.info.run_id for e in evaluations)
    assert [e.data.params["seed"] for e in evaluations] == ["0", "1"]
    table = pd.read_csv(experiment_dir / "trials.csv")
    assert list(table["seed"]) == [0, 1] and list(table["trial_id"]) == [trial, trial]
    assert list(table["val_robust_accuracy"]) == pytest.approx(per_seed)
