"""The paper's main experiment (Section 4: Tables 1-2, Figures 1-2) on Ray, recorded in MLflow.

For each dataset, sigma_aug (RAVEN) and eta (Smooth Encoder) are the best values of the
sweeps recorded in MLflow, or the paper's (Appendix C.2) with `paper_values` or when no
sweep is found. Every (dataset, method) is one Ray task that trains its seeds as one pack
(raven.reproduce.grid.run_pack, raven.pack) and runs the full evaluation (raven.eval.evaluate) of
each seed on the test set; the task returns every seed's numbers and files, and the driver
alone writes MLflow: one parent run per reproduction (tag
raven.role = "reproduction", the budget as params) and one child run per task (tags
raven.dataset / raven.method / raven.seed, the training config as params, per-epoch
metrics at step = epoch, the evaluation through raven.record.tracking.log_evaluation, the data it
read as dataset inputs, robustness.json, the plots and the checkpoint as artifacts). Workers
never need access to the tracking store. Without Ray or MLflow, raven.reproduce.offline runs
the same cells in a process pool, and `import_results` records its export here. The budget
and the cells are raven.reproduce.grid.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray

from raven.config import ConfigError
from raven.data import DataError
from raven.progress import bar, duration, say
from raven.record import tracking
from raven.record.tracking import (
    BUDGET,
    BUDGET_TEXT,
    DATASET,
    ETA_SWEEP_EXPERIMENT,
    FAILED_RUNS,
    HYPERPARAMETERS,
    IMPORTED_FROM,
    METHOD,
    NOTE,
    SEED,
    SIGMA_SWEEP_EXPERIMENT,
)
from raven.record.tracking import REPRODUCTION_EXPERIMENT as DEFAULT_EXPERIMENT
from raven.record.tracking import REPRODUCTION_ROLE as ROLE
from raven.record.tracking import REPRODUCTION_RUN_ROLE as CHILD_ROLE
from raven.reproduce.grid import (  # noqa: F401  (the budgets are public here too)
    FULL_BUDGET,
    SMOKE_BUDGET,
    Budget,
    Cell,
    CellResult,
    Hyperparameters,
    default_hyperparameters,
    eval_config,
    group_cells,
    paper_hyperparameters,
    run_pack,
    train_config,
)
from raven.reproduce.offline import read_export
from raven.sweep.cluster import TRIAL_GPU_SHARE, connect, run_tasks
from raven.sweep.selection import OBJECTIVE

# ----------------------------------------------------------------------------- hyperparameters from sweeps


def best_sweep_value(param: str, dataset: str, experiment: str, allow_smoke: bool) -> tuple[float, str] | None:
    """(best value, description) of the latest finished sweep of `param` on `dataset`, or None.

    Reads what raven.sweep.driver records on a sweep's parent run (tag raven.role = "sweep",
    params dataset / search.param / smoke, metric best_<param>: the top-ranked value on the
    validation objective). Smoke sweeps count only when `allow_smoke`.
    """
    for run in tracking.finished_sweeps(experiment, dataset, param):
        best = run.data.metrics.get(f"best_{param}")
        smoke = run.data.params.get("smoke") == "True"
        if best is None or (smoke and not allow_smoke):
            continue
        score = run.data.metrics.get(f"best_{OBJECTIVE}")
        text = (f"{'smoke ' if smoke else ''}sweep {run.data.tags.get(tracking.SWEEP_NAME, run.info.run_name)} "
                f"(run {run.info.run_id}" + (f", {OBJECTIVE} {score:.4f})" if score is not None else ")"))
        return float(best), text
    return None


def select_hyperparameters(datasets: tuple[str, ...], paper_values: bool, allow_smoke: bool,
                           log: Callable[[str], None], sigma_experiment: str = SIGMA_SWEEP_EXPERIMENT,
                           eta_experiment: str = ETA_SWEEP_EXPERIMENT) -> dict[str, Hyperparameters]:
    """Per dataset: the best sweep values recorded in the active tracking store, else raven's defaults (loudly)."""
    if paper_values:
        return {dataset: paper_hyperparameters(dataset, "--paper-values") for dataset in datasets}
    chosen = {}
    for dataset in datasets:
        fallback = default_hyperparameters(dataset, "no sweep found")
        values, sources = {}, []
        for param, experiment, script in (("sigma_aug", sigma_experiment, "sigma_aug.py"),
                                          ("eta", eta_experiment, "se_eta.py")):
            found = best_sweep_value(param, dataset, experiment, allow_smoke)
            if found is None:
                values[param] = getattr(fallback, param)
                sources.append(f"{param}: {fallback.source}")
                log(f"WARNING: no finished {param} sweep for {dataset} in experiment {experiment!r}"
                    f"{'' if allow_smoke else ' (smoke sweeps do not count for this budget)'}; using raven's default "
                    f"{param} = {values[param]:g}. Run sweeps/{script} first, or pass --paper-values to say so.")
            else:
                values[param] = found[0]
                sources.append(f"{param}: {found[1]}")
        chosen[dataset] = Hyperparameters(dataset, values["sigma_aug"], values["eta"], "; ".join(sources))
    return chosen


# ----------------------------------------------------------------------------- MLflow on the driver


def parent_params(budget: Budget, hps: dict[str, Hyperparameters]) -> dict[str, str]:
    """A reproduction parent's params: the budget, and sigma_aug / eta per dataset with their source."""
    params = budget.params()
    for hp in hps.values():
        params.update({f"sigma_aug.{hp.dataset}": str(hp.sigma_aug), f"eta.{hp.dataset}": str(hp.eta),
                       f"hyperparameters.{hp.dataset}": hp.source})
    return params


def log_cell(result: CellResult, budget: Budget, hp: Hyperparameters) -> str:
    """Record one finished task as a child of the active (parent) run; returns the child's run id."""
    cell = result.cell
    tags = {tracking.ROLE: CHILD_ROLE, DATASET: cell.dataset, METHOD: cell.method, SEED: str(cell.seed),
            BUDGET: budget.kind, HYPERPARAMETERS: hp.source}
    params = {**result.config, "budget": budget.describe(), "device": result.device, "node": result.node,
              "pack_size": result.pack_size}
    metrics = None
    if not result.error:
        best = max(result.history, key=lambda row: row["val_elbo"])
        metrics = {"epochs_trained": len(result.history), "best_epoch": best["epoch"],
                   "best_val_elbo": best["val_elbo"], "train_seconds": result.train_seconds,
                   "eval_seconds": result.eval_seconds}
    return tracking.log_child_run(cell.name, tags, params, result.inputs, result.history, error=result.error,
                                  metrics=metrics, evaluation=result.evaluation, files=result.files)


def find_parent(experiment_id: str, run_id: str | None) -> Any:
    """The reproduction parent run `run_id`, else the latest one in the experiment; None when there is none."""
    if run_id:
        run = tracking.get_run(run_id)
        if run.data.tags.get(tracking.ROLE) != ROLE:
            raise ConfigError(f"run {run_id} is not a reproduction (tag raven.role = {run.data.tags.get(tracking.ROLE)!r})")
        return run
    return tracking.latest_run(experiment_id, ROLE)


def finished_cells(experiment_id: str, parent_id: str) -> set[Cell]:
    """Cells the parent already holds complete; incomplete children (a crash while logging) are deleted."""
    done = tracking.complete_children(experiment_id, parent_id)
    return {Cell(tags[DATASET], tags[METHOD], int(tags[SEED])) for tags in done}


# ----------------------------------------------------------------------------- the driver


@dataclass
class ReproductionSummary:
    run_id: str
    experiment_id: str
    tracking_uri: str
    budget: Budget
    finished: list[Cell]
    skipped: list[Cell]
    failed: dict[Cell, str]
    seconds: float


def _failure(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def run_cells(cells: list[Cell], budget: Budget, hps: dict[str, Hyperparameters], address: str | None,
              cpus_per_task: float, gpus_per_task: float | None, data_dir: str | os.PathLike | None,
              out_root: Path, device: str, log: Callable[[str], None]) -> tuple[list[Cell], dict[Cell, str]]:
    """One Ray task per (dataset, method): its cells' seeds as one pack; each cell is logged as a child of
    the active MLflow run as its task's results arrive."""
    cluster = connect(address, log=log)
    try:
        gpus = cluster.gpus_per(gpus_per_task, TRIAL_GPU_SHARE)
        slots = cluster.slots(cpus_per_task, gpus)
        tracking.set_tags({"raven.cpus_per_task": str(cpus_per_task), "raven.gpus_per_task": str(gpus)})
        packs = group_cells(cells)
        jobs = {key: (group, [train_config(c, budget, hps[c.dataset]) for c in group],
                      [eval_config(c, budget) for c in group], None if data_dir is None else str(data_dir),
                      [str(out_root / c.name) for c in group], max(1, int(cpus_per_task)), device)
                for key, group in packs.items()}
        log(f"{len(jobs)} Ray task{'s' if len(jobs) != 1 else ''} submitted, one per (dataset, method), its seeds "
            f"trained as one pack: {len(cells)} run{'s' if len(cells) != 1 else ''} ({cpus_per_task:g} CPU and "
            f"{gpus:g} GPU a task, {slots} at a time); the time left is estimated from the first finished tasks")
        finished, failed, walls = [], {}, []
        progress = bar(len(cells), "reproduction", "run")

        def line(text: str) -> None:  # above the bar on a terminal, else through `log`
            if progress.disable:
                log(text)
            else:
                say(text, progress)

        for key, results, error in run_tasks(run_pack, jobs, cpus=cpus_per_task, gpus=gpus):
            group = packs[key]
            if error is not None:  # a crashed task is recorded and the rest go on
                results = [CellResult(c, train_config(c, budget, hps[c.dataset]).to_dict(), pack_size=len(group),
                                      error=_failure(error)) for c in group]
            # A task's wall: its pack's training once, then every seed's evaluation.
            walls.append(results[0].train_seconds + sum(r.eval_seconds for r in results))
            tasks_left = len(jobs) - len(walls)
            eta = f"; ~{duration(tasks_left * sum(walls) / len(walls) / slots)} left" \
                if tasks_left and sum(walls) else ""
            for result in results:
                cell = result.cell
                log_cell(result, budget, hps[cell.dataset])
                count = f"[{len(finished) + len(failed) + 1}/{len(cells)}] {cell.name}"
                progress.update(1)
                progress.set_postfix_str(eta.removeprefix("; "))
                if result.error:
                    failed[cell] = result.error
                    line(f"{count} FAILED: {result.error}{eta}")
                    continue
                finished.append(cell)
                ev = result.evaluation
                line(f"{count}: {len(result.history)} epochs, clean accuracy {ev.clean_accuracy:.4f}, MSE "
                     f"{ev.mse:.1f}, pair distance {ev.latent_pair_distance['mean']:.3g} ({result.train_seconds:.0f}s "
                     f"train for the pack of {len(group)}, {result.eval_seconds:.0f}s eval, {result.device}){eta}")
        progress.close()
        return finished, failed
    finally:
        ray.shutdown()


def import_results(path: str | os.PathLike, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                   note: str = "", log: Callable[[str], None] | None = None) -> str:
    """Record an export of raven.reproduce.offline in MLflow as one reproduction; returns the parent run id."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    budget, hps, results = read_export(path)
    tracking.open_store(tracking_uri, experiment)
    tags = {tracking.ROLE: ROLE, BUDGET: budget.kind, BUDGET_TEXT: budget.describe(), IMPORTED_FROM: str(path),
            NOTE: note}
    with tracking.parent_run(None, f"reproduction-{budget.kind}-imported", tags, parent_params(budget, hps)) as run_id:
        for result in results:
            log_cell(result, budget, hps[result.cell.dataset])
        tracking.set_tags({FAILED_RUNS: str(sum(1 for r in results if r.error))})
        log(f"imported {len(results)} runs into reproduction {run_id} ({budget.describe()})")
        return run_id


def reproduce(
    budget: Budget,
    *,
    paper_values: bool = False,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    address: str | None = None,
    cpus_per_task: float = 1.0,
    gpus_per_task: float | None = None,
    resume: bool = False,
    run_id: str | None = None,
    data_dir: str | os.PathLike | None = None,
    work_dir: str | os.PathLike = "runs/reproduce",
    device: str = "auto",
    sigma_experiment: str = SIGMA_SWEEP_EXPERIMENT,
    eta_experiment: str = ETA_SWEEP_EXPERIMENT,
    log: Callable[[str], None] | None = None,
) -> ReproductionSummary:
    """Run (or resume) a reproduction on Ray and record it in MLflow; returns what happened.

    `tracking_uri` None is MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder (the
    sweeps' default), where the sweeps' best sigma_aug / eta are looked up too. `address`
    None starts a new local Ray with this machine's resources; "auto" or HOST:PORT joins a
    running cluster (raven.sweep.cluster.connect, as the sweeps do). `gpus_per_task` None is 0.25
    when the cluster has GPUs, else 0. Checkpoints go to work_dir/<parent run id>/<cell> on
    the node that trains. With `resume`, the parent `run_id` (default: the latest reproduction
    in `experiment`) is reopened with its own hyperparameters, its budget must equal `budget`,
    and the cells it already holds complete are skipped.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if cpus_per_task <= 0 or (gpus_per_task is not None and gpus_per_task < 0):
        raise ConfigError(f"cpus_per_task must be > 0 and gpus_per_task >= 0, got {cpus_per_task}, {gpus_per_task}")
    if run_id and not resume:
        raise ConfigError("--run-id names a reproduction to resume; add --resume")
    started = time.perf_counter()
    uri, experiment_id = tracking.open_store(tracking_uri, experiment)
    log(f"raven reproduce: {budget.describe()}")

    parent = find_parent(experiment_id, run_id) if resume else None
    if resume and parent is None:
        log(f"--resume: no reproduction in experiment {experiment!r} yet; starting a new one")
    if parent is not None:
        held = {k: v for k, v in parent.data.params.items() if k.startswith("budget")}
        if held != budget.params():
            raise ConfigError(f"reproduction {parent.info.run_id} ran with another budget "
                              f"({parent.data.params.get('budget')}); resume it with the same flags or start a new one")
        hps = {d: Hyperparameters(d, float(parent.data.params[f"sigma_aug.{d}"]), float(parent.data.params[f"eta.{d}"]),
                                  parent.data.params[f"hyperparameters.{d}"]) for d in budget.datasets}
    else:
        hps = select_hyperparameters(budget.datasets, paper_values, allow_smoke=not budget.full, log=log,
                                     sigma_experiment=sigma_experiment, eta_experiment=eta_experiment)
    for hp in hps.values():
        log(f"{hp.dataset}: sigma_aug = {hp.sigma_aug:g}, eta = {hp.eta:g} ({hp.source})")

    tags = {tracking.ROLE: ROLE, BUDGET: budget.kind, BUDGET_TEXT: budget.describe()}
    with tracking.parent_run(parent.info.run_id if parent else None,
                           None if parent else f"reproduction-{budget.kind}", tags,
                           None if parent else parent_params(budget, hps)) as parent_id:
        done = finished_cells(experiment_id, parent_id) if parent else set()
        skipped = [c for c in budget.cells() if c in done]
        todo = [c for c in budget.cells() if c not in done]
        log(f"MLflow run {parent_id} in {uri}, experiment {experiment!r}"
            + (f"; resuming: {len(skipped)} of {len(budget.cells())} runs already recorded" if parent else ""))
        finished, failed = [], {}
        if todo:
            try:
                finished, failed = run_cells(todo, budget, hps, address, cpus_per_task, gpus_per_task, data_dir,
                                             Path(work_dir).resolve() / parent_id, device, log)
            except DataError as exc:
                raise ConfigError(str(exc)) from None
        tracking.set_tags({FAILED_RUNS: str(len(failed))})
    summary = ReproductionSummary(parent_id, experiment_id, uri, budget, finished, skipped,
                                  failed, time.perf_counter() - started)
    log(f"reproduction {parent_id}: {len(finished)} runs recorded, {len(skipped)} already there, {len(failed)} failed, "
        f"{summary.seconds:.0f}s; {budget.describe()}")
    return summary
