"""`raven sweep-report`: a sweep's MLflow record read back, checked against the record read independently."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_reproduce import smoke_store  # noqa: F401  (the session's shared store)

from raven.reproduce.sweep_report import SweepRun, load_report_sweeps, load_sweeps, pareto_trials

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raven.cli", "sweep-report", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture()
def store_copy(smoke_store, tmp_path):  # noqa: F811
    """A copy of the smoke store's database: tests here add runs to it."""
    shutil.copy(smoke_store.cwd / "mlflow.db", tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_the_report_holds_every_trial_and_the_best_as_the_record_has_them(store_copy, tmp_path):
    from mlflow import MlflowClient

    proc = _run("--tracking-uri", store_copy, "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "trials.csv", "evaluations.csv"):
        assert (tmp_path / "out" / name).is_file(), name
    for name in ("landscape.png", "pareto.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC, name
    # The record read independently: the parent, its trial and evaluation runs, through the client.
    client = MlflowClient(store_copy)
    experiment = client.get_experiment_by_name("raven-sigma-aug")
    parent = client.search_runs([experiment.experiment_id], "tags.`raven.role` = 'sweep'")[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = {r.data.tags["raven.trial_id"]: r for r in children if r.data.tags["raven.role"] == "trial"}
    table = pd.read_csv(tmp_path / "out" / "trials.csv", dtype={"trial_id": str})
    assert sorted(table["trial_id"]) == sorted(trials)
    for row in table.itertuples():
        run = trials[row.trial_id]
        assert row.sigma_aug == float(run.data.params["sigma_aug"])
        assert row.objective == run.data.metrics["val_robust_accuracy"]
        assert row.val_clean_accuracy == run.data.metrics["val_clean_accuracy"]
    # The sweep recorded its first estimate and the wall time of each stage, and the report sets them side by side.
    for name in ("search_seconds", "evaluation_seconds", "estimate_search_seconds", "estimate_evaluation_seconds"):
        assert parent.data.metrics[name] > 0, name
    metrics = parent.data.metrics
    timing = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines()
                  if line.startswith("| paper objective | search |"))
    assert timing == (f"| paper objective | search | {metrics['estimate_search_seconds'] / 60:.1f} min | "
                      f"{metrics['search_seconds'] / 60:.1f} min | "
                      f"{metrics['search_seconds'] / metrics['estimate_search_seconds']:.2f} |")
    best = parent.data.metrics["best_sigma_aug"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"best sigma_aug = {best:.4g}" in report and f"{best / 0.01:.3g}× the paper's 0.01" in report
    evaluations = pd.read_csv(tmp_path / "out" / "evaluations.csv", dtype={"trial_id": str})
    evaluated = [r for r in children if r.data.tags["raven.role"] == "evaluation"]
    assert len(evaluations) == len(evaluated) >= 1
    for run in evaluated:
        row = evaluations[evaluations["trial_id"] == run.data.tags["raven.trial_id"]].iloc[0]
        assert row["clean_accuracy"] == run.data.metrics["clean_accuracy"]
        assert row["sigma_aug"] == float(trials[row["trial_id"]].data.params["sigma_aug"])
    assert f"best sigma_aug = {best:.4g}" in proc.stdout


def test_a_later_raven_evaluate_of_a_sweep_checkpoint_joins_its_trial(store_copy):
    from mlflow import MlflowClient

    sweep = load_sweeps(store_copy, "raven-sigma-aug")[0]
    evaluated = sweep.evaluations.iloc[0]
    assert "robust_acc_delta_0.05" not in sweep.evaluations  # the smoke sweep ran the paper protocol only
    # What `raven evaluate DIR --protocol strong --tracking-uri URI --experiment raven-sigma-aug` leaves: a run
    # tagged with the checkpoint's resolved path, in the sweep's Tune folder, with the strong protocol's metrics.
    client = MlflowClient(store_copy)
    experiment = client.get_experiment_by_name("raven-sigma-aug")
    folder = sweep.parent["tags.raven.experiment_dir"]
    run = client.create_run(experiment.experiment_id, tags={
        "checkpoint": f"{folder}/evaluations/{evaluated['trial_id']}/checkpoint.pt"})
    client.log_metric(run.info.run_id, "robust_acc_delta_0.05", 0.25)
    client.log_metric(run.info.run_id, "clean_accuracy", 0.0)  # the sweep's own evaluation wins where both have it
    client.set_terminated(run.info.run_id)
    # A checkpoint outside the sweep's folder is someone else's.
    other = client.create_run(experiment.experiment_id, tags={
        "checkpoint": f"/elsewhere/evaluations/{evaluated['trial_id']}/checkpoint.pt"})
    client.log_metric(other.info.run_id, "robust_acc_delta_0.1", 0.5)
    client.set_terminated(other.info.run_id)

    joined = load_sweeps(store_copy, "raven-sigma-aug")[0].evaluations
    row = joined[joined["trial_id"] == evaluated["trial_id"]].iloc[0]
    assert row["robust_acc_delta_0.05"] == 0.25
    assert row["clean_accuracy"] == evaluated["clean_accuracy"] and row["clean_accuracy"] > 0
    assert run.info.run_id in row["runs"].split(",") and "robust_acc_delta_0.1" not in joined
    assert len(joined) == len(sweep.evaluations)


def test_a_report_folder_reads_back_as_the_sweeps_it_was_written_from(store_copy, tmp_path):
    first = _run("--tracking-uri", store_copy, "--out", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr[-3000:]
    (stored,) = load_sweeps(store_copy, "raven-sigma-aug")
    (back,) = load_report_sweeps(tmp_path / "first")
    assert back.name == stored.name and back.best_value == stored.best_value and back.source == str(tmp_path / "first")
    assert back.stage_seconds() == stored.stage_seconds()
    pd.testing.assert_frame_equal(back.trials[["trial_id", "value", "objective", "val_clean_accuracy"]],
                                  stored.trials[["trial_id", "value", "objective", "val_clean_accuracy"]])
    # From that folder alone, with an empty store: the same trials, best and timing, labelled as read back.
    again = _run("--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}", "--from-report", str(tmp_path / "first"),
                 "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "trials.csv").read_text() == (tmp_path / "first" / "trials.csv").read_text()
    old, new = ((tmp_path / d / "report.md").read_text().splitlines() for d in ("first", "again"))
    assert [line for line in old if line.startswith(("- **", "| paper objective |"))] == \
           [line for line in new if line.startswith(("- **", "| paper objective |"))]
    assert f"read back from {tmp_path / 'first'}" in next(line for line in new if line.startswith("**Budget"))
    evaluations = [pd.read_csv(tmp_path / d / "evaluations.csv") for d in ("first", "again")]
    assert evaluations[0]["clean_accuracy"].tolist() == evaluations[1]["clean_accuracy"].tolist()
    bad = _run("--from-report", str(tmp_path), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "is not a sweep report folder: sweeps.json" in bad.stderr, bad.stderr


def test_the_pareto_front_is_the_brute_force_one():
    rng = np.random.default_rng(0)
    trials = pd.DataFrame({"trial_id": [f"t{i}" for i in range(40)], "value": 10 ** rng.uniform(-3, 0, 40),
                           "status": "FINISHED", "val_clean_accuracy": rng.uniform(0.8, 0.95, 40).round(2),
                           "objective": rng.uniform(0.5, 0.8, 40).round(2)})
    sweep = SweepRun(pd.Series(dtype=object), trials, pd.DataFrame())
    front = set(pareto_trials(sweep)["trial_id"])
    expected = {a.trial_id for a in trials.itertuples() if not any(
        b.val_clean_accuracy >= a.val_clean_accuracy and b.objective >= a.objective
        and (b.val_clean_accuracy, b.objective) != (a.val_clean_accuracy, a.objective) for b in trials.itertuples())}
    assert front == expected and len(front) >= 2


def test_stage_times_come_from_the_parent_metrics_else_from_the_runs_clocks():
    start = pd.Timestamp("2026-12-06 10:00", tz="UTC")
    trials = pd.DataFrame({"end": [start + pd.Timedelta(minutes=m) for m in (20, 47)]})
    parent = pd.Series({"start_time": start, "end_time": start + pd.Timedelta(minutes=90)}, dtype=object)
    derived = SweepRun(parent, trials, pd.DataFrame()).stage_seconds()
    assert derived["search"][1] == 47 * 60 and derived["evaluation"][1] == 43 * 60
    assert all(np.isnan(estimate) for estimate, _ in derived.values())
    recorded = parent.copy()
    for stage, seconds in (("search", 2000.0), ("evaluation", 1500.0)):
        recorded[f"metrics.{stage}_seconds"], recorded[f"metrics.estimate_{stage}_seconds"] = seconds, 1000.0
    timed = SweepRun(recorded, trials, pd.DataFrame()).stage_seconds()
    assert timed == {"search": (1000.0, 2000.0), "evaluation": (1000.0, 1500.0)}


def test_bad_input_stops_in_one_line(store_copy, tmp_path):
    for args, message in ((("--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}"), "no MLflow experiment"),
                          (("--tracking-uri", store_copy, "--sweep", "no-such-sweep"), "no sweep named no-such-sweep"),
                          (("--tracking-uri", store_copy, "--dataset", "fashion-mnist"), "holds no sweep on")):
        proc = _run(*args, "--out", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error" in line]  # MLflow logs its new tables
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
