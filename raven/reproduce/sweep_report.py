"""`raven sweep-report`: what one or more sweeps found, read back from their MLflow record.

A sweep (sweeps/sigma_aug.py, se_eta.py, tc_beta.py; raven.sweep.driver) leaves in MLflow a
parent run (its budget as params; its best value, first time estimate and wall times as
metrics), a child run per trial (the searched value as a param, the per-epoch metrics, the
objective at the last epoch) and a child run per evaluated seed (the test set, under the
protocol the sweep chose). This module reads several sweeps of one searched parameter on one
data set, typically the same search under the paper's and the strong objective, and writes:

- `trials.csv`: every trial of every sweep (its objective, validation clean accuracy and ELBO);
- `landscape.png`: each objective, the validation clean accuracy and the validation ELBO against
  the searched value (log axis), the sweeps' trials on the same axes;
- `pareto.png`: per sweep, validation clean accuracy against its robust objective, with the
  trials no other trial beats in both (raven.sweep.selection.pareto_mask);
- `evaluations.csv`: the test-set evaluations of the sweeps' trials, one row per (trial, seed);
- `report.md`: the budget, the first estimate against the wall time of each stage, the best value
  under each objective with its test evaluation, and the trial tables.

An evaluation made later with `raven evaluate CHECKPOINT --tracking-uri URI --experiment E`, of a
checkpoint inside a sweep's Tune folder (`trial_ID/...` or `evaluations/ID/...`), counts as that
trial's: so a protocol the sweep's own evaluation left out (the strong protocol after a
paper-objective search) or the paper's value can be added, and it reads beside the rest.

The report also writes `sweeps.json`, each sweep's parent record (its params, metrics and raven
tags), so that a report folder can be read back as sweeps of its own (`--from-report DIR`,
`load_report_sweeps`): a sweep whose MLflow store is gone, or lives on another machine, then reads
beside the sweeps of the store at hand.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from raven.config import ConfigError  # noqa: E402
from raven.eval.plots import DATASET_LABELS  # noqa: E402
from raven.record.tracking import (  # noqa: E402
    CHECKPOINT,
    EXPERIMENT_DIR,
    ROLE,
    SEED,
    SWEEP_NAME,
    TRIAL_ID,
    use_store,
)
from raven.reproduce.reading import markdown_table  # noqa: E402
from raven.sweep.selection import pareto_mask  # noqa: E402

# Which test numbers the report shows: the paper protocol's robust reading (mean over its attacks) and
# the strong protocol, at the budgets where MNIST models still differ.
PAPER_DELTAS = ("0.05", "0.1", "0.2")
STRONG_DELTAS = ("0.025", "0.05", "0.1")
OBJECTIVE_LABELS = {"val_robust_accuracy": "paper objective", "val_strong_robust_accuracy": "strong objective",
                    "val_certified_accuracy": "certified objective"}
# The trial a checkpoint belongs to, from its path inside the sweep's Tune folder.
_TRIAL_IN_PATH = re.compile(r"(?:/trial_|/evaluations/)([0-9a-f]{5,})(?:/|$)")
_SEED_IN_PATH = re.compile(r"/seed-(\d+)(?:/|$)")
SWEEPS_FILE = "sweeps.json"
_STAGES = (("search", "search_seconds", "estimate_search_seconds"),
           ("evaluation", "evaluation_seconds", "estimate_evaluation_seconds"))


class SweepReportError(ConfigError):
    """No sweep to report on, or sweeps that cannot be read side by side."""


@dataclass
class SweepRun:
    """One sweep as its MLflow record holds it."""

    parent: pd.Series
    trials: pd.DataFrame  # one row per trial: trial_id, run_id, status, value, objective, val_*, epochs, start, end
    evaluations: pd.DataFrame  # one row per evaluated (trial, seed): trial_id, seed, value, runs, metrics
    source: str = ""  # "" from the MLflow store at hand, else the report folder it was read back from

    @property
    def name(self) -> str:
        return str(self.parent[f"tags.{SWEEP_NAME}"])

    @property
    def param(self) -> str:
        return str(self.parent["params.search.param"])

    @property
    def dataset(self) -> str:
        return str(self.parent["params.dataset"])

    @property
    def objective(self) -> str:
        """The first objective's metric (the one that ranks the trials), e.g. val_robust_accuracy."""
        return str(self.parent["params.search.objectives"]).split(",")[0].split(":")[0]

    @property
    def label(self) -> str:
        return OBJECTIVE_LABELS.get(self.objective, self.objective)

    @property
    def paper_value(self) -> float:
        return float(self.parent.get("params.search.space.paper") or np.nan)

    @property
    def best_value(self) -> float:
        return float(self.parent.get(f"metrics.best_{self.param}", np.nan))

    def stage_seconds(self) -> dict[str, tuple[float, float]]:
        """{stage: (first estimate, wall time)} in seconds, NaN where the record lacks it. A sweep recorded before
        the driver logged its timing gets its wall times from the runs' clocks: the search from the parent's start
        to the last trial's end, the evaluation from there to the parent's end; its estimate stays unknown."""
        out = {}
        last_trial = self.trials["end"].max()
        derived = {"search_seconds": (last_trial - self.parent["start_time"]).total_seconds(),
                   "evaluation_seconds": (self.parent["end_time"] - last_trial).total_seconds()
                   if pd.notna(self.parent.get("end_time")) else np.nan}
        for stage, wall, estimate in _STAGES:
            measured = float(self.parent.get(f"metrics.{wall}", np.nan))
            out[stage] = (float(self.parent.get(f"metrics.{estimate}", np.nan)),
                          measured if np.isfinite(measured) else derived[wall])
        return out


def _time(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_datetime(frame[column], utc=True) if column in frame else pd.Series(pd.NaT, index=frame.index)


def _number(run: pd.Series, column: str) -> float:
    value = pd.to_numeric(run.get(column), errors="coerce")
    return float(value) if pd.notna(value) else np.nan


def load_sweeps(tracking_uri: str | None, experiment: str, names: list[str] | None = None,
                dataset: str | None = None) -> list[SweepRun]:
    """The sweeps `names` of `experiment`; by default the latest sweep of each objective on `dataset` (default:
    the data set of the latest sweep), so that a search under the paper's and one under the strong objective
    are read side by side. All must search the same parameter on the same data set."""
    uri = use_store(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise SweepReportError(f"no MLflow experiment {experiment!r} at {uri}; run a sweep first "
                               "(python sweeps/sigma_aug.py --smoke) or pass --tracking-uri / --experiment")
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], order_by=["attributes.start_time DESC"])
    role = runs.get(f"tags.{ROLE}", pd.Series("", index=runs.index))
    parents = runs[role == "sweep"]
    if names:
        missing = [n for n in names if n not in set(parents[f"tags.{SWEEP_NAME}"])]
        if missing:
            raise SweepReportError(f"no sweep named {', '.join(missing)} in experiment {experiment!r} at {uri}")
        parents = parents[parents[f"tags.{SWEEP_NAME}"].isin(names)]
    else:
        if parents.empty:
            raise SweepReportError(f"experiment {experiment!r} at {uri} holds no sweep")
        dataset = dataset or str(parents.iloc[0]["params.dataset"])
        parents = parents[parents["params.dataset"] == dataset]
        if parents.empty:
            raise SweepReportError(f"experiment {experiment!r} at {uri} holds no sweep on {dataset}")
        first = parents["params.search.objectives"].str.split(",").str[0]
        parents = parents[~first.duplicated()]  # newest first: the latest sweep of each objective
    if parents["params.search.param"].nunique() > 1 or parents["params.dataset"].nunique() > 1:
        raise SweepReportError("the sweeps search different parameters or data sets: "
                               + ", ".join(f"{r[f'tags.{SWEEP_NAME}']} ({r['params.search.param']} on "
                                           f"{r['params.dataset']})" for _, r in parents.iterrows()))
    return [_sweep(parent, runs) for _, parent in parents.iloc[::-1].iterrows()]


def _sweep(parent: pd.Series, runs: pd.DataFrame) -> SweepRun:
    parent = parent.copy()
    parent["start_time"], parent["end_time"] = (pd.to_datetime(parent.get(c), utc=True) for c in ("start_time", "end_time"))
    param, objective = str(parent["params.search.param"]), str(parent["params.search.objectives"]).split(":")[0]
    children = runs[runs.get("tags.mlflow.parentRunId", pd.Series(index=runs.index, dtype=object)) == parent["run_id"]]
    trial_runs = children[children[f"tags.{ROLE}"] == "trial"]
    trials = pd.DataFrame({
        "trial_id": trial_runs[f"tags.{TRIAL_ID}"], "run_id": trial_runs["run_id"], "status": trial_runs["status"],
        "value": pd.to_numeric(trial_runs[f"params.{param}"], errors="coerce"),
        "seeds": trial_runs.get("params.seed", pd.Series("", index=trial_runs.index)).astype(str),
        "objective": pd.to_numeric(trial_runs.get(f"metrics.{objective}"), errors="coerce"),
        **{name: pd.to_numeric(trial_runs.get(f"metrics.{name}"), errors="coerce")
           for name in ("val_clean_accuracy", "val_elbo", "val_mse_255", "epoch")},
        "start": _time(trial_runs, "start_time"), "end": _time(trial_runs, "end_time")}).rename(columns={"epoch": "epochs"})
    trials = trials.sort_values("start").reset_index(drop=True)
    return SweepRun(parent, trials, _evaluations(parent, children, runs, trials))


def _evaluations(parent: pd.Series, children: pd.DataFrame, runs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """The sweep's own evaluation runs, then `raven evaluate` runs of checkpoints in its Tune folder (newest first),
    merged per (trial, seed): a metric comes from the first run that has it."""
    rows = []
    for _, run in children[children[f"tags.{ROLE}"] == "evaluation"].iterrows():
        rows.append((str(run[f"tags.{TRIAL_ID}"]), int(_number(run, f"tags.{SEED}")), run))
    folder = str(parent.get(f"tags.{EXPERIMENT_DIR}") or "")
    paths = runs.get(f"tags.{CHECKPOINT.removeprefix('raven.')}", pd.Series(index=runs.index, dtype=object))
    for index, path in paths.items():  # raven evaluate tags its runs "checkpoint" with the resolved path
        if not folder or not isinstance(path, str) or not path.startswith(folder.rstrip("/") + "/"):
            continue
        trial, seed = _TRIAL_IN_PATH.search(path), _SEED_IN_PATH.search(path)
        known = trials[trials["trial_id"] == (trial.group(1) if trial else None)]
        if known.empty:
            continue
        rows.append((trial.group(1), int(seed.group(1)) if seed else int(str(known["seeds"].iloc[0]).split(",")[0]),
                     runs.loc[index]))
    merged: dict[tuple[str, int], dict[str, object]] = {}
    for trial_id, seed, run in rows:
        entry = merged.setdefault((trial_id, seed), {"trial_id": trial_id, "seed": seed, "runs": []})
        entry["runs"].append(str(run["run_id"]))
        for column, value in run.items():
            if column.startswith("metrics.") and pd.notna(value) and column[8:] not in entry:
                entry[column[8:]] = float(value)
    out = pd.DataFrame(list(merged.values()))
    if out.empty:
        return pd.DataFrame(columns=["trial_id", "seed", "value", "runs"])
    out["value"] = out["trial_id"].map(dict(zip(trials["trial_id"], trials["value"])))
    out["runs"] = out["runs"].map(",".join)
    return out.sort_values(["value", "seed"]).reset_index(drop=True)


def parent_record(sweep: SweepRun) -> dict[str, object]:
    """The parent run's params, metrics and raven tags, its status and clock, as plain JSON data (sweeps.json)."""
    record = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in sweep.parent.items()
              if k.startswith(("params.", "metrics.", "tags.raven.")) and pd.notna(v)}
    for key in ("run_id", "status"):
        record[key] = str(sweep.parent.get(key, ""))
    for key in ("start_time", "end_time"):
        record[key] = sweep.parent[key].isoformat() if pd.notna(sweep.parent.get(key)) else None
    record["source"] = sweep.source or "MLflow"
    return record


def load_report_sweeps(folder: str | Path) -> list[SweepRun]:
    """The sweeps of an earlier report folder (its sweeps.json, trials.csv and evaluations.csv), as SweepRuns."""
    folder = Path(folder)
    missing = [n for n in (SWEEPS_FILE, "trials.csv", "evaluations.csv") if not (folder / n).is_file()]
    if missing:
        raise SweepReportError(f"{folder} is not a sweep report folder: {', '.join(missing)} missing "
                               "(raven sweep-report --out writes them)")
    records = json.loads((folder / SWEEPS_FILE).read_text())
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str, "seeds": str})
    evaluations = pd.read_csv(folder / "evaluations.csv", dtype={"trial_id": str})
    out = []
    for record in records:
        parent = pd.Series(record, dtype=object)
        parent["start_time"], parent["end_time"] = (pd.to_datetime(record.get(c), utc=True) for c in
                                                    ("start_time", "end_time"))
        param, name = str(parent["params.search.param"]), str(parent[f"tags.{SWEEP_NAME}"])
        mine = trials[trials["sweep"] == name].rename(columns={param: "value"}).drop(columns=["sweep",
                                                                                             "objective_metric"])
        mine["start"], mine["end"] = _time(mine, "start"), _time(mine, "end")
        evaluated = evaluations[evaluations["sweep"] == name].rename(columns={param: "value"})
        evaluated = evaluated.drop(columns=["sweep", "objective_metric"]).dropna(axis=1, how="all")
        source = record.get("source") if record.get("source") not in (None, "MLflow") else str(folder)
        out.append(SweepRun(parent, mine.reset_index(drop=True), evaluated.reset_index(drop=True), source))
    return out


def merge_sweeps(stored: list[SweepRun], earlier: list[SweepRun]) -> list[SweepRun]:
    """The store's sweeps and those of earlier reports that the store lacks, oldest first; one parameter and data
    set."""
    names = {s.name for s in stored}
    sweeps = sorted(stored + [s for s in earlier if s.name not in names], key=lambda s: s.parent["start_time"])
    if not sweeps:
        raise SweepReportError("no sweep to report on")
    if len({(s.param, s.dataset) for s in sweeps}) > 1:
        raise SweepReportError("the sweeps search different parameters or data sets: " + ", ".join(
            f"{s.name} ({s.param} on {s.dataset})" for s in sweeps))
    return sweeps


# ----------------------------------------------------------------------------- tables and figures


def trial_frame(sweeps: list[SweepRun]) -> pd.DataFrame:
    """Every trial of every sweep, with the sweep and its objective's metric."""
    frames = [s.trials.assign(sweep=s.name, objective_metric=s.objective) for s in sweeps]
    frame = pd.concat(frames, ignore_index=True)
    columns = ["sweep", "objective_metric", "trial_id", "value", "seeds", "status", "objective", "val_clean_accuracy",
               "val_elbo", "val_mse_255", "epochs", "start", "end", "run_id"]
    return frame[columns].rename(columns={"value": sweeps[0].param})


def evaluation_frame(sweeps: list[SweepRun]) -> pd.DataFrame:
    frames = [s.evaluations.assign(sweep=s.name, objective_metric=s.objective) for s in sweeps]
    frame = pd.concat(frames, ignore_index=True)
    first = ["sweep", "objective_metric", "trial_id", "value", "seed"]
    return frame[first + [c for c in frame.columns if c not in first]].rename(columns={"value": sweeps[0].param})


def plot_landscape(sweeps: list[SweepRun], path: Path) -> Path:
    """Each sweep's objective, validation clean accuracy and ELBO against the searched value (log axis)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    panels = (("objective", "validation robust accuracy (%)", 100), ("val_clean_accuracy",
              "validation clean accuracy (%)", 100), ("val_elbo", "validation ELBO (nats)", 1))
    for color, sweep in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], sweeps):
        done = sweep.trials[sweep.trials["status"] == "FINISHED"].dropna(subset=["value"]).sort_values("value")
        for ax, (column, label, scale) in zip(axes, panels):
            ax.plot(done["value"], scale * done[column], "o-", color=color, alpha=0.8, ms=5, lw=0.8,
                    label=f"{sweep.label} ({sweep.name})" if column == "objective" else sweep.label)
            best = done[np.isclose(done["value"], sweep.best_value, rtol=1e-9, atol=0)]
            ax.plot(best["value"], scale * best[column], "*", color=color, ms=16, mec="black")
            ax.set(xscale="log", xlabel=sweep.param, ylabel=label)
    paper = sweeps[0].paper_value
    for ax in axes:
        if np.isfinite(paper):
            ax.axvline(paper, color="grey", ls="--", lw=1, label=f"paper's value {paper:g}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{DATASET_LABELS.get(sweeps[0].dataset, sweeps[0].dataset)}: each sweep's trials (star: its best)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_trials(sweep: SweepRun) -> pd.DataFrame:
    """The trials no other trial of the sweep beats in both validation clean accuracy and its robust objective."""
    done = sweep.trials[sweep.trials["status"] == "FINISHED"].dropna(subset=["val_clean_accuracy", "objective"])
    mask = pareto_mask(done[["val_clean_accuracy", "objective"]].to_numpy(), ["max", "max"]) if len(done) else []
    return done[mask].sort_values("val_clean_accuracy")


def plot_pareto(sweeps: list[SweepRun], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.5), layout="constrained", squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        done = sweep.trials[sweep.trials["status"] == "FINISHED"].dropna(subset=["val_clean_accuracy", "objective"])
        points = ax.scatter(100 * done["val_clean_accuracy"], 100 * done["objective"], c=np.log10(done["value"]),
                            cmap="viridis", s=30, zorder=3)
        front = pareto_trials(sweep)
        ax.plot(100 * front["val_clean_accuracy"], 100 * front["objective"], "-", color="crimson", lw=1.2,
                label="Pareto front")
        for _, row in front.iterrows():
            ax.annotate(f"{row['value']:.3g}", (100 * row["val_clean_accuracy"], 100 * row["objective"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        fig.colorbar(points, ax=ax, label=f"log10 {sweep.param}")
        ax.set(xlabel="validation clean accuracy (%)", ylabel=f"{sweep.objective} (%)", title=sweep.label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pct(value: object) -> str:
    return f"{100 * float(value):.1f}" if pd.notna(value) else "—"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if np.isfinite(seconds) else "not recorded"


def evaluation_markdown(sweeps: list[SweepRun]) -> str:
    """One row per evaluated (trial, seed) of each sweep: clean accuracy, the paper protocol's robust reading
    (mean over its attacks) and the strong protocol at a few δ, MSE and FID; the sweep's best marked."""
    header = ["Sweep objective", sweeps[0].param, "seed", "clean (%)",
              *(f"paper δ={d} (%)" for d in PAPER_DELTAS), *(f"strong δ={d} (%)" for d in STRONG_DELTAS), "MSE", "FID"]
    rows = []
    for sweep in sweeps:
        for _, row in sweep.evaluations.iterrows():
            paper = []
            for delta in PAPER_DELTAS:
                values = [row[c] for c in row.index if re.fullmatch(rf"adv_robust_acc_[a-z0-9]+_delta_{re.escape(delta)}", c)
                          and pd.notna(row[c])]
                paper.append(_pct(np.mean(values)) if values else "—")
            best = " (best)" if np.isclose(row["value"], sweep.best_value, rtol=1e-9, atol=0) else ""
            rows.append([sweep.label, f"{row['value']:.4g}{best}", str(row["seed"]), _pct(row.get("clean_accuracy")),
                         *paper, *(_pct(row.get(f"robust_acc_delta_{d}")) for d in STRONG_DELTAS),
                         f"{row['mse_255']:.1f}" if pd.notna(row.get("mse_255")) else "—",
                         f"{row['fid']:.2f}" if pd.notna(row.get("fid")) else "—"])
    return markdown_table(header, rows)


def trials_markdown(sweep: SweepRun) -> str:
    header = [sweep.param, "trial", "status", f"{sweep.objective} (%)", "val clean (%)", "val ELBO", "epochs"]
    rows = [[f"{r.value:.4g}" + (" (best)" if np.isclose(r.value, sweep.best_value, rtol=1e-9, atol=0) else ""),
             r.trial_id, r.status, _pct(r.objective), _pct(r.val_clean_accuracy),
             f"{r.val_elbo:.2f}" if pd.notna(r.val_elbo) else "—", f"{r.epochs:.0f}" if pd.notna(r.epochs) else "—"]
            for r in sweep.trials.sort_values("value").itertuples()]
    return markdown_table(header, rows)


def timing_markdown(sweeps: list[SweepRun]) -> str:
    header = ["Sweep objective", "stage", "first estimate", "wall time", "wall / estimate"]
    rows = []
    for sweep in sweeps:
        for stage, (estimate, wall) in sweep.stage_seconds().items():
            ratio = f"{wall / estimate:.2f}" if np.isfinite(estimate) and estimate > 0 and np.isfinite(wall) else "—"
            rows.append([sweep.label, stage, _minutes(estimate), _minutes(wall), ratio])
    return markdown_table(header, rows)


def write_sweep_report(out: str | Path, sweeps: list[SweepRun]) -> Path:
    """trials.csv, evaluations.csv, landscape.png, pareto.png and report.md in `out`; returns report.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trial_frame(sweeps).to_csv(out / "trials.csv", index=False)
    (out / SWEEPS_FILE).write_text(json.dumps([parent_record(s) for s in sweeps], indent=1) + "\n")
    evaluation_frame(sweeps).to_csv(out / "evaluations.csv", index=False)
    plot_landscape(sweeps, out / "landscape.png")
    plot_pareto(sweeps, out / "pareto.png")
    first, param = sweeps[0], sweeps[0].param
    budget = "; ".join(
        f"{s.label}: `{s.name}`, {s.parent.get('params.budget.trials')} trials of "
        f"{s.parent.get('params.train.epochs')} epochs ({s.parent.get('params.budget.seeds')} seed(s) each), "
        f"{param} {s.parent.get('params.search.space.type')} in [{s.parent.get('params.search.space.low')}, "
        f"{s.parent.get('params.search.space.high')}], objective {s.objective} on the validation split, final "
        f"evaluation protocol {s.parent.get('params.evaluation.protocol')}, code {str(s.parent.get('params.code_version'))[:7]}"
        + (f" (read back from {s.source})" if s.source else "")
        for s in sweeps)
    best = "\n".join(
        f"- **{s.label}** (`{s.objective}`): " + (
            f"best {param} = {s.best_value:.4g}"
            + (f", {s.best_value / s.paper_value:.3g}× the paper's {s.paper_value:g}" if np.isfinite(s.paper_value) else "")
            + f"; its validation objective {_pct(s.parent.get(f'metrics.best_{s.objective}'))} %."
            if np.isfinite(s.best_value) else f"no best {param} recorded yet (sweep {s.parent.get('status')})")
        for s in sweeps)
    text = f"""# {param} sweeps on {DATASET_LABELS.get(first.dataset, first.dataset)}

Written {datetime.datetime.now().isoformat(timespec="seconds")} by `raven sweep-report` from the MLflow
record (tracking store `{mlflow.get_tracking_uri()}`).

**Budget.** {budget}.

## Where each objective puts {param}

{best}

![landscape](landscape.png)

Each sweep's trials: its own objective (left; both are validation robust accuracies, the paper's
mean over its PGD attacks and budgets, or the strong protocol's share of images that survive),
the validation clean accuracy and the validation ELBO, against {param} on a log axis; the star is
the sweep's best, the dashed line the paper's value.

## Test-set evaluations

The sweeps' own final evaluations and any `raven evaluate` run of a checkpoint in a sweep's Tune
folder (the paper protocol's robust reading, averaged over its attacks; the strong protocol, every
iterate of every attack and AutoAttack; "—" where that protocol was not run):

{evaluation_markdown(sweeps)}

## Clean accuracy against robustness

![Pareto front](pareto.png)

## Time: first estimate and wall time

{timing_markdown(sweeps)}

The search runs from the parent run's start to its last trial's end, the evaluation from there to the
end of the sweep (from the parent run's metrics `search_seconds` and `evaluation_seconds` where the
sweep recorded them). The first estimate is the one the sweep printed before its first epoch
(`estimate_*_seconds`).

## Trials
"""
    for sweep in sweeps:
        text += f"\n### {sweep.label} (`{sweep.name}`)\n\n{trials_markdown(sweep)}\n"
    text += ("\n## Files\n\n`trials.csv` (every trial of every sweep), `evaluations.csv` (every test metric of the "
             "evaluated trials and the MLflow runs they come from), `sweeps.json` (each sweep's parent record, so "
             "that `raven sweep-report --from-report` reads this folder back), `landscape.png`, `pareto.png`.\n")
    path = out / "report.md"
    path.write_text(text)
    return path
