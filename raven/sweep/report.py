"""What a finished sweep shows: the trial table, the study's plots, the Pareto front, the summary on screen.

The trial table is Tune's own (`ResultGrid.get_dataframe`: each trial's last result and config)
with the trial's status, checkpoint and MLflow run beside it, one row per seed of each trial (a
trial trains its configuration's seeds as one pack); the plots are Optuna's, drawn
from the sweep's study (optimisation history, the searched value against the objective and,
with several objectives, the Pareto front).
"""

from __future__ import annotations

import json
import os
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster's head node
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization.matplotlib as optuna_plots  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from raven.eval import plots  # noqa: E402
from raven.eval.evaluate import format_summary  # noqa: E402
from raven.eval.plots import DATASET_LABELS  # noqa: E402
from raven.record.tracking import use_store  # noqa: E402
from raven.sweep.selection import OBJECTIVE, Objective, seed_key  # noqa: E402
from raven.sweep.spec import SweepSpec, hide_password  # noqa: E402

TRIALS_CSV = "trials.csv"
HISTORY_PNG = "optimization_history.png"
SLICE_PNG = "search_slice.png"
PARETO_CSV, PARETO_JSON, PARETO_PNG = "pareto_front.csv", "pareto_front.json", "pareto_front.png"
EVALUATIONS_CSV = "evaluations.csv"
CURVES_PNG = "evaluated_robustness_curves.png"


def trial_table(results, spec: SweepSpec, run_ids: dict[str, str]) -> pd.DataFrame:
    """One row per seed of each trial, trials in creation order: number, trial_id, status, the searched
    value, seed, epochs, the objectives and validation metrics of that seed in its trial's last result,
    objective_seconds (the trial's), checkpoint (the trial's; the seed's is its seed-S/ folder), MLflow run,
    error. A seed that diverged in a trial that finished has status DIVERGED and no metrics."""
    frame = results.get_dataframe()
    meta = pd.DataFrame([{
        "number": number, "trial_id": Path(result.path).name.removeprefix("trial_"),
        "status": "ERROR" if result.error else "TERMINATED",
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else "",
        "error": str(result.error).splitlines()[0][:200] if result.error else "",
    } for number, result in enumerate(results)], columns=["number", "trial_id", "status", "checkpoint", "error"])
    if frame.empty:
        frame = pd.DataFrame({"trial_id": pd.Series(dtype=str)})
    frame = frame.rename(columns={f"config/{spec.param}": spec.param, "epoch": "epochs"})
    trials = meta.merge(frame, on="trial_id", how="left")
    trials["mlflow_run_id"] = trials["trial_id"].map(run_ids).fillna("")
    metrics = list(dict.fromkeys([o.metric for o in spec.objective_list]
                                 + ["val_robust_accuracy", "val_clean_accuracy", "val_elbo", "val_mse_255"]))
    seeds = []
    for seed in spec.seed_list:
        rows = trials.copy()
        rows["seed"] = seed
        if spec.seeds > 1:  # the seed's own values (raven.sweep.selection.seed_statistics)
            for name in metrics:
                rows[name] = trials[seed_key(name, seed)] if seed_key(name, seed) in trials else np.nan
            rows.loc[(rows["status"] == "TERMINATED") & rows["val_elbo"].isna(), "status"] = "DIVERGED"
        seeds.append(rows)
    table = pd.concat(seeds).sort_values(["number", "seed"], kind="stable").reset_index(drop=True)
    columns = ["number", "trial_id", "status", spec.param, "seed", "epochs", *metrics, "objective_seconds",
               "checkpoint", "mlflow_run_id", "error"]
    return table.reindex(columns=columns)


def _save(ax, path: Path) -> Path:
    figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    figure.set_size_inches(9, 4.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def study_plots(study: optuna.Study, spec: SweepSpec, out: Path) -> list[Path]:
    """Optuna's optimisation history and slice plot of the first objective, and the Pareto front with several."""
    objectives = spec.objective_list
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return []
    first = objectives[0].metric
    target = (lambda t: t.values[0]) if len(objectives) > 1 else None
    paths = []
    # Optuna's plots switch matplotlib to its ggplot style globally; rc_context restores the settings.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        paths.append(_save(optuna_plots.plot_optimization_history(study, target=target, target_name=first),
                           out / HISTORY_PNG))
        paths.append(_save(optuna_plots.plot_slice(study, target=target, target_name=first), out / SLICE_PNG))
        if len(objectives) > 1:
            shown = list(range(min(3, len(objectives))))
            paths.append(_save(optuna_plots.plot_pareto_front(
                study, targets=lambda t: [t.values[i] for i in shown],
                target_names=[objectives[i].metric for i in shown]), out / PARETO_PNG))
    return paths


def pareto_table(ranked: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    """The configurations on the Pareto front, best first by the first objective."""
    front = ranked[ranked["pareto"].astype(bool)]
    return front.drop(columns=["pareto"]).reset_index().rename(columns={"index": spec.param})


def summary_metrics(spec: SweepSpec, table: pd.DataFrame, ranked: pd.DataFrame,
                    evaluations: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The parent run's metrics: trial counts (and with several seeds, seeds_diverged), best_<objective>
    and best_<param> (the top-ranked configuration), the Pareto front's size, and the test results of
    the best evaluated trial."""
    errored = table.loc[table["status"] == "ERROR", "trial_id"].nunique()
    metrics = {"trials_completed": float(table["trial_id"].nunique() - errored), "trials_errored": float(errored)}
    if spec.seeds > 1:
        metrics["seeds_diverged"] = float((table["status"] == "DIVERGED").sum())
    if not ranked.empty:
        for objective in spec.objective_list:
            metrics[f"best_{objective.metric}"] = float(ranked[f"{objective.metric}_mean"].iloc[0])
        metrics[f"best_{spec.param}"] = float(ranked.index[0])
        if len(spec.objective_list) > 1:
            metrics["pareto_front_size"] = float(ranked["pareto"].sum())
    if evaluations:
        best = evaluations[0]["metrics"]
        adv = [v for k, v in best.items() if k.startswith("adv_acc_") and not k.endswith("_delta_0")]
        if "clean_accuracy" in best:
            metrics["best_test_clean_accuracy"] = float(best["clean_accuracy"])
        if adv:
            metrics["best_test_mean_adv_accuracy"] = float(sum(adv) / len(adv))
    return metrics


def evaluation_outputs(spec: SweepSpec, evaluations: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """evaluations.csv (one row per evaluated trial) and the robustness curves of those evaluated now."""
    if not evaluations:
        return []
    rows = [{"trial_id": e["trial_id"], spec.param: e["value"], "seed": e["seed"],
             "evaluation_run_id": e["run_id"], **e["metrics"]} for e in evaluations]
    paths = [out / EVALUATIONS_CSV]
    pd.DataFrame(rows).to_csv(paths[0], index=False)
    curves = [(f"{spec.param}={e['value']:.4g}", e["result"].to_json()) for e in evaluations if "result" in e]
    if curves:
        paths.append(plots.plot_accuracy_curves(curves, out / CURVES_PNG,
                                                title=f"{spec.name}: test robustness of the best"))
    return paths


def compare_link(experiment_id: str, run_ids: Sequence[str]) -> str:
    """The MLflow UI's compare view of these runs (its Scatter Plot puts a param against a metric), as a URL path."""
    return (f"/#/compare-runs?runs={urllib.parse.quote(json.dumps(list(run_ids)))}"
            f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")


def print_summary(spec: SweepSpec, table: pd.DataFrame, ranked: pd.DataFrame, evaluations: Sequence[dict[str, Any]],
                  experiment_id: str, parent_id: str, seconds: float, trial_run_ids: Sequence[str] = ()) -> None:
    objectives: Sequence[Objective] = spec.objective_list
    metrics = list(dict.fromkeys([o.metric for o in objectives] + ["val_clean_accuracy", "val_elbo"]))
    columns = ["number", "trial_id", "status", spec.param, "seed", "epochs", *metrics]
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.float_format", "{:.4g}".format):
        seeds = f", {spec.seeds} seeds each, one row per seed" if spec.seeds > 1 else ""
        print(f"\nTrials of sweep {spec.name} ({table['trial_id'].nunique()}{seeds}):")
        print(table[columns].to_string(index=False))
    if ranked.empty:
        print("\nNo trial completed with an objective value.")
    else:
        stats = ranked.iloc[0]
        first = objectives[0].metric
        spread = f" +- {stats[f'{first}_std']:.4f} over {int(stats['count'])} seeds" if stats["count"] > 1 else ""
        others = "".join(f", {o.metric} {stats[f'{o.metric}_mean']:.4g}" for o in objectives[1:])
        print(f"\nBest configuration: {spec.method} {spec.param}={ranked.index[0]:.6g} on {spec.dataset}: "
              f"{first} {stats[f'{first}_mean']:.4f}{spread}{others} (validation split)")
        if len(objectives) > 1:
            front = ", ".join(f"{v:.4g}" for v in ranked.index[ranked["pareto"].astype(bool)])
            print(f"Pareto front ({', '.join(map(str, objectives))}): {spec.param} = {front}")
    results = [e["result"] for e in evaluations if "result" in e]
    if results:
        print("\nTest-set evaluation of the best configuration(s):")
        print(format_summary(results))
    for item in evaluations:
        if item.get("reused"):
            print(f"(trial {item['trial_id']}: evaluation read back from MLflow run {item['run_id']})")
    # MLflow 3.17's UI opens an experiment on its GenAI overview unless the link selects model training.
    print(f"\nMLflow: {spec.tracking_uri}, experiment {spec.experiment!r} (UI: /#/experiments/{experiment_id}"
          f"?workflowType=machine_learning), parent run {parent_id}; Tune results: {spec.experiment_dir.resolve()}; "
          f"Optuna: optuna-dashboard {hide_password(spec.study_storage)}; {seconds:.0f}s")
    if trial_run_ids:  # the comparison a user makes: the trials' objective against the searched value
        axis = f"log10_{spec.param}" if spec.space.is_log_uniform else spec.param
        print(f"Compare the trials (Scatter Plot: {axis} on X, {spec.objective_list[0].metric} on Y): "
              f"{compare_link(experiment_id, trial_run_ids)}")


# ----------------------------------------------------------------------------- a sweep read back from MLflow (results notebook)


@dataclass
class Sweep:
    """A sweep's parent run (raven.sweep.driver) and its trial runs: one row per seed of each trial (a trial of
    several seeds is one run holding `<metric>_seed<S>`), the searched value and objective."""

    param: str
    parent: pd.Series
    trials: pd.DataFrame  # columns: run_id, status, seed, <param>, val_robust_accuracy, val_elbo, val_mse_255

    @property
    def dataset(self) -> str:
        return str(self.parent["params.dataset"])

    @property
    def best(self) -> float:
        return float(self.parent.get(f"metrics.best_{self.param}", np.nan))

    @property
    def paper_value(self) -> float:
        """The paper's selected value on this data set, as the sweep recorded it (its search space's); NaN if none."""
        return float(self.parent.get("params.search.space.paper") or np.nan)


def load_sweep(param: str = "sigma_aug", dataset: str | None = None, experiment: str | None = None,
               tracking_uri: str | None = None) -> Sweep | None:
    """The latest sweep of `param` (sigma_aug, eta, ...) recorded by sweeps/*.py in `experiment` (default: in any
    experiment), or None when there is none."""
    use_store(tracking_uri)
    if experiment is not None and mlflow.get_experiment_by_name(experiment) is None:
        return None
    where = {"experiment_names": [experiment]} if experiment is not None else {"search_all_experiments": True}
    query = f"tags.`raven.role` = 'sweep' and params.`search.param` = '{param}'"
    if dataset:
        query += f" and params.dataset = '{dataset}'"
    parents = mlflow.search_runs(**where, filter_string=query, order_by=["attributes.start_time DESC"])
    if parents.empty:
        return None
    parent = parents.iloc[0]
    runs = mlflow.search_runs(experiment_ids=[parent["experiment_id"]], filter_string=(
        f"tags.mlflow.parentRunId = '{parent['run_id']}' and tags.`raven.role` = 'trial'"))
    rows = []
    for _, run in runs.iterrows():
        seeds = str(run.get("params.seed", "")).split(",")  # "0" or, for a trial of several seeds, "0,1,2"
        for seed in seeds:
            row = {"run_id": run["run_id"], "status": run["status"], param: run.get(f"params.{param}"), "seed": seed}
            for name in (OBJECTIVE, "val_elbo", "val_mse_255"):
                row[name] = run.get(f"metrics.{name}" if len(seeds) == 1 else f"metrics.{name}_seed{seed}")
            rows.append(row)
    columns = ["run_id", "status", param, "seed", OBJECTIVE, "val_elbo", "val_mse_255"]
    trials = pd.DataFrame(rows, columns=columns)
    for name in columns[2:]:
        trials[name] = pd.to_numeric(trials[name], errors="coerce")
    return Sweep(param, parent, trials.sort_values([param, "seed"]).reset_index(drop=True))


def plot_sweep(sweep: Sweep, path: str | os.PathLike | None = None) -> Figure:
    """The selection objective against the searched value (log x): trials, mean per value, best and paper's value."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    done = sweep.trials.dropna(subset=[sweep.param, OBJECTIVE])
    ax.scatter(done[sweep.param], 100 * done[OBJECTIVE], color="tab:blue", zorder=3, label="trial")
    means = done.groupby(sweep.param)[OBJECTIVE].mean()
    ax.plot(means.index, 100 * means.to_numpy(), color="tab:blue", alpha=0.5)
    if np.isfinite(sweep.best):
        ax.axvline(sweep.best, color="tab:red", linestyle="--", label=f"best {sweep.best:.4g}")
    if np.isfinite(sweep.paper_value):
        ax.axvline(sweep.paper_value, color="tab:gray", linestyle=":", label=f"paper {sweep.paper_value:g}")
    ax.set_xscale("log")
    ax.set_xlabel(sweep.param)
    ax.set_ylabel(f"{OBJECTIVE} (%)")
    smoke = " (smoke)" if str(sweep.parent.get("params.smoke")) == "True" else ""
    ax.set_title(f"{sweep.param} sweep on {DATASET_LABELS.get(sweep.dataset, sweep.dataset)}{smoke}: "
                 "validation robust accuracy", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        _save(fig, path)
    return fig
