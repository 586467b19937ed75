"""The paper's main experiment (Section 4: Tables 1-2, Figures 1-2) on Ray, recorded in MLflow.

For each dataset, sigma_aug (RAVEN) and eta (Smooth Encoder) are the best values of the
sweeps recorded in MLflow, or the paper's (Appendix C.2) with `paper_values` or when no
sweep is found. Every (dataset, method, seed) is one Ray task that trains the model and
runs the full evaluation (raven.evaluate) on the test set; the task returns its numbers and
files, and the driver alone writes MLflow: one parent run per reproduction (tag
raven.role = "reproduction", the budget as params) and one child run per task (tags
raven.dataset / raven.method / raven.seed, the training config as params, per-epoch
metrics at step = epoch, every evaluator metric, robustness.json, the plots and the
checkpoint as artifacts). Workers never need access to the tracking store.

"Until the model converges" (Section 4.1.2) is made concrete as at most `epochs` epochs
with early stopping when the validation ELBO has not improved for `patience` epochs.
A Budget below the full one is stated in every output: the parent's and every child's
"budget" param and raven.budget tag, the console, and the report.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raven.config import DATASETS, METHODS, PAPER_ETA, PAPER_SIGMA_AUG, ConfigError, TrainConfig

ROLE = "reproduction"
CHILD_ROLE = "reproduction-run"
DEFAULT_EXPERIMENT = "raven-reproduction"
# Where sweeps/sigma_aug.py and sweeps/se_eta.py record their sweeps by default.
SIGMA_SWEEP_EXPERIMENT = "raven-sigma-aug"
ETA_SWEEP_EXPERIMENT = "raven-se-eta"
PAPER_SEEDS = 5
TRAIN_SPLIT_IMAGES = 55_000
TEST_IMAGES = 10_000
# Tag set last on a child run: its numbers and files are all in the store.
COMPLETE_TAG = "raven.complete"
CHECKPOINT_ARTIFACTS = "checkpoint"


@dataclass(frozen=True)
class Budget:
    """How much of the paper's experiment to run; the defaults are the full reproduction.

    epochs/patience: at most `epochs` epochs, stopping early once val_elbo has not improved
    for `patience` epochs (None: always `epochs`). limit: training images (None: the
    55,000-image training split). eval_limit: test images attacked and measured (None:
    10,000). probe_limit: training images the linear probe is fitted on (None: all). seeds:
    0 .. seeds-1. steps: PGD steps per attack (paper: 50). fid: compute FID (Table 2).
    """

    epochs: int = 100
    patience: int | None = 5
    limit: int | None = None
    eval_limit: int | None = None
    probe_limit: int | None = None
    seeds: int = PAPER_SEEDS
    steps: int = 50
    datasets: tuple[str, ...] = DATASETS
    methods: tuple[str, ...] = METHODS
    fid: bool = True
    smoke: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "seeds", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("patience", "limit", "eval_limit", "probe_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 (or unset), got {value!r}")
        for name, allowed in (("datasets", DATASETS), ("methods", METHODS)):
            values = (getattr(self, name),) if isinstance(getattr(self, name), str) else tuple(getattr(self, name))
            if not values:
                raise ConfigError(f"{name} must name at least one of {', '.join(allowed)}")
            for value in values:
                if value not in allowed:
                    raise ConfigError(f"unknown {name[:-1]} {value!r}; choose from {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} must not repeat, got {','.join(values)}")
            object.__setattr__(self, name, values)

    @property
    def full(self) -> bool:
        """True when nothing is scaled down from the full reproduction (smoke aside)."""
        return dataclasses.replace(self, smoke=False) == FULL_BUDGET

    @property
    def kind(self) -> str:
        return "full" if self.full else ("smoke" if self.smoke else "reduced")

    def cells(self) -> list["Cell"]:
        return [Cell(d, m, s) for d in self.datasets for m in self.methods for s in range(self.seeds)]

    def describe(self) -> str:
        """One line: 'full' or what is scaled down, against the full reproduction."""
        if self.full:
            return ("full budget: up to 100 epochs with early stopping (patience 5 on val_elbo), all 55,000 "
                    "training images, 10,000 test images, probe on all training images, 5 seeds, 50-step PGD, "
                    "FID, both datasets, all methods")
        changes = []
        if (self.epochs, self.patience) != (FULL_BUDGET.epochs, FULL_BUDGET.patience):
            stop = f"early stopping patience {self.patience}" if self.patience else "no early stopping"
            changes.append(f"{self.epochs} epochs max ({stop}; full: 100, patience 5)")
        if self.limit is not None:
            changes.append(f"{self.limit:,} of {TRAIN_SPLIT_IMAGES:,} training images")
        if self.eval_limit is not None:
            changes.append(f"{self.eval_limit:,} of {TEST_IMAGES:,} test images")
        if self.probe_limit is not None:
            changes.append(f"probe on {self.probe_limit:,} of {TRAIN_SPLIT_IMAGES:,} training images")
        if self.seeds != FULL_BUDGET.seeds:
            changes.append(f"{self.seeds} of {PAPER_SEEDS} seeds")
        if self.steps != FULL_BUDGET.steps:
            changes.append(f"{self.steps}-step PGD (paper: 50)")
        if not self.fid:
            changes.append("no FID")
        if self.datasets != DATASETS:
            changes.append("datasets " + ", ".join(self.datasets))
        if self.methods != METHODS:
            changes.append("methods " + ", ".join(self.methods))
        return f"REDUCED budget{' (--smoke)' if self.smoke else ''}: " + "; ".join(changes)

    def replace(self, **changes: Any) -> "Budget":
        return dataclasses.replace(self, **changes)

    def params(self) -> dict[str, str]:
        """The budget as MLflow params (strings), plus the one-line description under 'budget'."""
        values = dataclasses.asdict(self)
        out = {f"budget.{k}": ",".join(v) if isinstance(v, tuple) else str(v) for k, v in values.items()}
        out["budget"] = self.describe()
        return out


FULL_BUDGET = Budget()
# Sized to finish in a few minutes on 2 CPU cores while still producing every table and
# figure: both datasets, all five methods, 2 seeds (so a std over seeds exists) = 20 tasks.
SMOKE_BUDGET = Budget(epochs=2, patience=None, limit=5000, eval_limit=300, probe_limit=5000, seeds=2, steps=10,
                      fid=False, smoke=True)


@dataclass(frozen=True)
class Cell:
    """One (dataset, method, seed) of the reproduction: one Ray task, one MLflow child run."""

    dataset: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.method}-s{self.seed}"


@dataclass(frozen=True)
class Hyperparameters:
    """sigma_aug and eta of one dataset, and where they came from."""

    dataset: str
    sigma_aug: float
    eta: float
    source: str


def paper_hyperparameters(dataset: str, why: str) -> Hyperparameters:
    return Hyperparameters(dataset, PAPER_SIGMA_AUG[dataset], PAPER_ETA[dataset], f"paper, Appendix C.2 ({why})")


def train_config(cell: Cell, budget: Budget, hp: Hyperparameters) -> TrainConfig:
    """The paper's setting for one cell (RAdam 1e-3, batch 128, d = 10, noise 0.05) under `budget`."""
    return TrainConfig(method=cell.method, dataset=cell.dataset, sigma_aug=hp.sigma_aug, eta=hp.eta,
                       epochs=budget.epochs, patience=budget.patience, seed=cell.seed, limit=budget.limit)


def eval_config(cell: Cell, budget: Budget) -> Any:
    from raven.evaluate import EvalConfig

    return EvalConfig(steps=budget.steps, limit=budget.eval_limit, probe_limit=budget.probe_limit, fid=budget.fid,
                      tsne=True, seed=cell.seed)


# ----------------------------------------------------------------------------- the Ray task


@dataclass
class CellResult:
    """What a task sends back to the driver: numbers, and its files as bytes (nodes share no disk)."""

    cell: Cell
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    evaluation: Any = None  # raven.evaluate.EvalResult, its artifact paths local to the worker
    files: dict[str, bytes] = field(default_factory=dict)  # "checkpoint/checkpoint.pt" -> bytes
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    device: str = ""
    node: str = ""
    error: str | None = None


def run_cell(cell: Cell, config: TrainConfig, evaluation: Any, data_dir: str | None, out_dir: str,
             threads: int = 1, device: str = "auto") -> CellResult:
    """Train `config` into out_dir (resuming a checkpoint there) and evaluate it on the test set.

    Runs inside a Ray worker (or in process). A diverged run comes back with `error` set.
    """
    import platform

    import torch

    from raven.data import load_splits
    from raven.evaluate import evaluate_model
    from raven.train import CHECKPOINT_NAME, METRICS_NAME, TrainingDiverged, resolve_device, train

    torch.set_num_threads(max(1, threads))
    device = resolve_device(device)
    out = Path(out_dir)
    result = CellResult(cell, config.to_dict(), device=str(device), node=platform.node())
    # The whole training split: train() keeps the first config.limit images, the probe the
    # first probe_limit (the paper's probe sees every training image).
    splits = load_splits(config.dataset, data_dir, device, config.validation_size)
    started = time.perf_counter()
    try:
        trained = train(config, splits=splits, device=device, out_dir=out, progress=False)
    except TrainingDiverged as exc:
        result.error = f"training diverged: {exc}"
        return result
    result.history = trained.history
    result.train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result.evaluation = evaluate_model(trained.model, splits, evaluation, out_dir=out / "evaluation", label=cell.name)
    result.eval_seconds = time.perf_counter() - started
    for path in result.evaluation.artifacts:
        result.files[f"robustness/{Path(path).name}"] = Path(path).read_bytes()
    for name in (CHECKPOINT_NAME, METRICS_NAME):
        result.files[f"{CHECKPOINT_ARTIFACTS}/{name}"] = (out / name).read_bytes()
    return result


# ----------------------------------------------------------------------------- hyperparameters from sweeps


def best_sweep_value(param: str, dataset: str, experiment: str, allow_smoke: bool) -> tuple[float, str] | None:
    """(best value, description) of the latest finished sweep of `param` on `dataset`, or None.

    Reads what raven.sweep records on a sweep's parent run (tag raven.role = "sweep",
    params dataset / search.param / smoke, metric best_<param>: the value with the best
    validation objective). Smoke sweeps count only when `allow_smoke`.
    """
    from mlflow.tracking import MlflowClient

    from raven.sweep import OBJECTIVE

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`raven.role` = 'sweep' and params.dataset = '{dataset}' "
                      f"and params.`search.param` = '{param}' and attributes.status = 'FINISHED'")
    for run in runs:
        best = run.data.metrics.get(f"best_{param}")
        smoke = run.data.params.get("smoke") == "True"
        if best is None or (smoke and not allow_smoke):
            continue
        score = run.data.metrics.get(f"best_{OBJECTIVE}")
        text = (f"{'smoke ' if smoke else ''}sweep {run.data.tags.get('raven.sweep_name', run.info.run_name)} "
                f"(run {run.info.run_id}" + (f", {OBJECTIVE} {score:.4f})" if score is not None else ")"))
        return float(best), text
    return None


def select_hyperparameters(datasets: tuple[str, ...], paper_values: bool, allow_smoke: bool,
                           log: Callable[[str], None], sigma_experiment: str = SIGMA_SWEEP_EXPERIMENT,
                           eta_experiment: str = ETA_SWEEP_EXPERIMENT) -> dict[str, Hyperparameters]:
    """Per dataset: the best sweep values recorded in the active tracking store, else the paper's (loudly)."""
    if paper_values:
        return {dataset: paper_hyperparameters(dataset, "--paper-values") for dataset in datasets}
    chosen = {}
    for dataset in datasets:
        paper = paper_hyperparameters(dataset, "no sweep found")
        values, sources = {}, []
        for param, experiment, script in (("sigma_aug", sigma_experiment, "sigma_aug.py"),
                                          ("eta", eta_experiment, "se_eta.py")):
            found = best_sweep_value(param, dataset, experiment, allow_smoke)
            if found is None:
                values[param] = getattr(paper, param)
                sources.append(f"{param}: {paper.source}")
                log(f"WARNING: no finished {param} sweep for {dataset} in experiment {experiment!r}"
                    f"{'' if allow_smoke else ' (smoke sweeps do not count for this budget)'}; using the paper's "
                    f"{param} = {values[param]:g}. Run sweeps/{script} first, or pass --paper-values to say so.")
            else:
                values[param] = found[0]
                sources.append(f"{param}: {found[1]}")
        chosen[dataset] = Hyperparameters(dataset, values["sigma_aug"], values["eta"], "; ".join(sources))
    return chosen


# ----------------------------------------------------------------------------- MLflow on the driver


def _flat_params(values: dict[str, Any]) -> dict[str, str]:
    return {k: ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v) for k, v in values.items()}


def _log_params(params: dict[str, str]) -> None:
    import mlflow

    items = list(params.items())
    for i in range(0, len(items), 90):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(items[i:i + 90]))


def parent_params(budget: Budget, hps: dict[str, Hyperparameters]) -> dict[str, str]:
    """A reproduction parent's params: the budget, and sigma_aug / eta per dataset with their source."""
    params = budget.params()
    for hp in hps.values():
        params.update({f"sigma_aug.{hp.dataset}": str(hp.sigma_aug), f"eta.{hp.dataset}": str(hp.eta),
                       f"hyperparameters.{hp.dataset}": hp.source})
    return params


def _log_history(run_id: str, history: list[dict[str, float]]) -> None:
    """Per-epoch metrics at step = epoch."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(row["epoch"]))
               for row in history for key, value in row.items() if key != "epoch"]
    client = MlflowClient()
    for i in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 900])


def log_cell(result: CellResult, budget: Budget, hp: Hyperparameters) -> str:
    """Record one finished task as a child of the active (parent) run; returns the child's run id."""
    import mlflow

    from raven.evaluate import log_to_mlflow

    cell = result.cell
    tags = {"raven.role": CHILD_ROLE, "raven.dataset": cell.dataset, "raven.method": cell.method,
            "raven.seed": str(cell.seed), "raven.budget": budget.kind, "raven.hyperparameters": hp.source}
    with mlflow.start_run(run_name=cell.name, nested=True, tags=tags) as run:
        _log_params({**_flat_params(result.config), "budget": budget.describe(), "device": result.device,
                     "node": result.node})
        if result.history:
            _log_history(run.info.run_id, result.history)
        if result.error:
            mlflow.set_tag("raven.error", result.error[:5000])
            mlflow.end_run(status="FAILED")
            return run.info.run_id
        best = max(result.history, key=lambda row: row["val_elbo"])
        mlflow.log_metrics({"epochs_trained": len(result.history), "best_epoch": best["epoch"],
                            "best_val_elbo": best["val_elbo"], "train_seconds": result.train_seconds,
                            "eval_seconds": result.eval_seconds})
        with tempfile.TemporaryDirectory() as tmp:
            local = {}
            for name, data in result.files.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                local[name] = path
            evaluation = dataclasses.replace(
                result.evaluation, artifacts=[p for n, p in local.items() if n.startswith("robustness/")])
            log_to_mlflow(evaluation)
            mlflow.log_artifacts(str(Path(tmp) / CHECKPOINT_ARTIFACTS), artifact_path=CHECKPOINT_ARTIFACTS)
        mlflow.set_tag(COMPLETE_TAG, "true")
        return run.info.run_id


def find_parent(experiment_id: str, run_id: str | None) -> Any:
    """The reproduction parent run `run_id`, else the latest one in the experiment; None when there is none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if run_id:
        run = client.get_run(run_id)
        if run.data.tags.get("raven.role") != ROLE:
            role = run.data.tags.get("raven.role")
            raise ConfigError(f"run {run_id} is not a reproduction (tag raven.role = {role!r})")
        return run
    runs = client.search_runs([experiment_id], filter_string=f"tags.`raven.role` = '{ROLE}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def finished_cells(experiment_id: str, parent_id: str) -> set[Cell]:
    """Cells the parent already holds complete; incomplete children (a crash while logging) are deleted."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    done = set()
    for run in client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  max_results=50_000):
        tags = run.data.tags
        if tags.get(COMPLETE_TAG) == "true" and run.info.status == "FINISHED":
            done.add(Cell(tags["raven.dataset"], tags["raven.method"], int(tags["raven.seed"])))
        else:
            client.delete_run(run.info.run_id)
    return done


# ----------------------------------------------------------------------------- the driver


def connect_ray(address: str | None) -> None:
    """A new local Ray for None (never a cluster found on this machine), else join as the sweeps do."""
    import logging

    import ray

    from raven.sweep import SweepError
    from raven.sweep import connect_ray as join_cluster

    if address is None:
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        return
    try:
        join_cluster(address)
    except SweepError as exc:
        raise ConfigError(str(exc)) from None


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


def run_cells(cells: list[Cell], budget: Budget, hps: dict[str, Hyperparameters], address: str | None,
              cpus_per_task: float, gpus_per_task: float | None, data_dir: str | os.PathLike | None,
              out_root: Path, device: str, log: Callable[[str], None]) -> tuple[list[Cell], dict[Cell, str]]:
    """One Ray task per cell; each result is logged as a child of the active MLflow run as it arrives."""
    import mlflow
    import ray

    connect_ray(address)
    try:
        if gpus_per_task is None:
            gpus_per_task = 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        mlflow.set_tags({"raven.cpus_per_task": str(cpus_per_task), "raven.gpus_per_task": str(gpus_per_task)})
        task = ray.remote(run_cell)
        pending = {}
        for cell in cells:
            ref = task.options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, name=cell.name).remote(
                cell, train_config(cell, budget, hps[cell.dataset]), eval_config(cell, budget),
                None if data_dir is None else str(data_dir), str(out_root / cell.name), max(1, int(cpus_per_task)),
                device)
            pending[ref] = cell
        log(f"{len(cells)} Ray task{'s' if len(cells) != 1 else ''} submitted "
            f"({cpus_per_task:g} CPU, {gpus_per_task:g} GPU each)")
        finished, failed = [], {}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a crashed task is recorded and the rest go on
                lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                result = CellResult(cell, train_config(cell, budget, hps[cell.dataset]).to_dict(),
                                    error=lines[-1] if lines else type(exc).__name__)
            log_cell(result, budget, hps[cell.dataset])
            count = f"[{len(finished) + len(failed) + 1}/{len(cells)}] {cell.name}"
            if result.error:
                failed[cell] = result.error
                log(f"{count} FAILED: {result.error}")
                continue
            finished.append(cell)
            ev = result.evaluation
            log(f"{count}: {len(result.history)} epochs, clean accuracy {ev.clean_accuracy:.4f}, MSE {ev.mse:.1f}, "
                f"pair distance {ev.latent_pair_distance['mean']:.3g} ({result.train_seconds:.0f}s train, "
                f"{result.eval_seconds:.0f}s eval, {result.device})")
        return finished, failed
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- without Ray or MLflow


def run_cells_offline(cells: list[Cell], budget: Budget, hps: dict[str, Hyperparameters], workers: int,
                      data_dir: str | os.PathLike | None, out_root: Path, device: str, export: Path,
                      log: Callable[[str], None]) -> tuple[list[Cell], dict[Cell, str]]:
    """Run cells in a local process pool and append each result to `export` as it arrives.

    For a machine that has torch but neither Ray nor MLflow (a lent GPU box): the file is
    a pickle stream, a header {budget, hyperparameters} then one CellResult per cell, so
    whatever finished survives an interruption. `import_results` records it in MLflow
    elsewhere. Checkpoints stay on the machine that trained (they are not exported).
    """
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor, as_completed

    finished, failed = [], {}
    # spawn: CUDA cannot be used in a forked child.
    with open(export, "wb") as sink, ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pickle.dump({"budget": budget, "hyperparameters": hps}, sink)
        futures = {pool.submit(run_cell, cell, train_config(cell, budget, hps[cell.dataset]), eval_config(cell, budget),
                               None if data_dir is None else str(data_dir), str(out_root / cell.name), 1, device): cell
                   for cell in cells}
        log(f"{len(cells)} cells on {workers} local processes, device {device}; results -> {export}")
        for future in as_completed(futures):
            cell = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed cell is recorded and the rest go on
                result = CellResult(cell, train_config(cell, budget, hps[cell.dataset]).to_dict(),
                                    error=f"{type(exc).__name__}: {exc}")
            result.files = {k: v for k, v in result.files.items() if not k.startswith(CHECKPOINT_ARTIFACTS + "/")
                            or k.endswith("metrics.json")}
            pickle.dump(result, sink)
            sink.flush()
            if result.error:
                failed[cell] = result.error
                log(f"{cell.name} FAILED: {result.error}")
            else:
                finished.append(cell)
                log(f"[{len(finished) + len(failed)}/{len(cells)}] {cell.name}: {len(result.history)} epochs, "
                    f"clean accuracy {result.evaluation.clean_accuracy:.4f} ({result.train_seconds:.0f}s train, "
                    f"{result.eval_seconds:.0f}s eval)")
    return finished, failed


def read_export(path: str | os.PathLike) -> tuple[Budget, dict[str, Hyperparameters], list[CellResult]]:
    """The header and every complete CellResult of an export (a truncated last record is dropped)."""
    import pickle

    results = []
    with open(path, "rb") as source:
        header = pickle.load(source)
        while True:
            try:
                results.append(pickle.load(source))
            except (EOFError, pickle.UnpicklingError):
                break
    return header["budget"], header["hyperparameters"], results


def import_results(path: str | os.PathLike, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                   note: str = "", log: Callable[[str], None] | None = None) -> str:
    """Record an export of run_cells_offline in MLflow as one reproduction; returns the parent run id."""
    import mlflow

    from raven.tracking import resolve_tracking_uri

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    budget, hps, results = read_export(path)
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
    mlflow.set_experiment(experiment)
    tags = {"raven.role": ROLE, "raven.budget": budget.kind, "raven.budget_text": budget.describe(),
            "raven.imported_from": str(path), "raven.note": note}
    with mlflow.start_run(run_name=f"reproduction-{budget.kind}-imported", tags=tags) as run:
        _log_params(parent_params(budget, hps))
        for result in results:
            log_cell(result, budget, hps[result.cell.dataset])
        mlflow.set_tag("raven.failed_runs", str(sum(1 for r in results if r.error)))
        log(f"imported {len(results)} runs into reproduction {run.info.run_id} ({budget.describe()})")
        return run.info.run_id


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
    export: str | os.PathLike | None = None,
    workers: int = 4,
) -> ReproductionSummary | Path:
    """Run (or resume) a reproduction on Ray and record it in MLflow; returns what happened.

    `tracking_uri` None is MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder (the
    sweeps' default), where the sweeps' best sigma_aug / eta are looked up too. `address`
    None starts a new local Ray with this machine's resources; "auto" or HOST:PORT joins a
    running cluster, as the sweeps do. `gpus_per_task` None is 0.25 when the cluster has
    GPUs, else 0. Checkpoints go to work_dir/<parent run id>/<cell> on the node that trains.
    With `resume`, the parent `run_id` (default: the latest reproduction in `experiment`)
    is reopened with its own hyperparameters, its budget must equal `budget`, and the
    cells it already holds complete are skipped.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if export is not None:
        # No tracking store and no Ray here: sweeps cannot be looked up, so the paper's values are used.
        hps = {d: paper_hyperparameters(d, "offline export") for d in budget.datasets}
        log(f"raven reproduce (offline export): {budget.describe()}")
        run_cells_offline(budget.cells(), budget, hps, workers, data_dir, Path(work_dir).resolve() / "offline",
                          device, Path(export), log)
        return Path(export)
    import mlflow

    from raven.tracking import resolve_tracking_uri

    if cpus_per_task <= 0 or (gpus_per_task is not None and gpus_per_task < 0):
        raise ConfigError(f"cpus_per_task must be > 0 and gpus_per_task >= 0, got {cpus_per_task}, {gpus_per_task}")
    if run_id and not resume:
        raise ConfigError("--run-id names a reproduction to resume; add --resume")
    started = time.perf_counter()
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
    experiment_id = mlflow.set_experiment(experiment).experiment_id
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

    tags = {"raven.role": ROLE, "raven.budget": budget.kind, "raven.budget_text": budget.describe()}
    with mlflow.start_run(run_id=parent.info.run_id if parent else None,
                          run_name=None if parent else f"reproduction-{budget.kind}", tags=tags) as run:
        parent_id = run.info.run_id
        if parent is None:
            _log_params(parent_params(budget, hps))
        done = finished_cells(experiment_id, parent_id) if parent else set()
        skipped = [c for c in budget.cells() if c in done]
        todo = [c for c in budget.cells() if c not in done]
        log(f"MLflow run {parent_id} in {mlflow.get_tracking_uri()}, experiment {experiment!r}"
            + (f"; resuming: {len(skipped)} of {len(budget.cells())} runs already recorded" if parent else ""))
        finished, failed = [], {}
        if todo:
            finished, failed = run_cells(todo, budget, hps, address, cpus_per_task, gpus_per_task, data_dir,
                                         Path(work_dir).resolve() / parent_id, device, log)
        mlflow.set_tag("raven.failed_runs", str(len(failed)))
    summary = ReproductionSummary(parent_id, experiment_id, mlflow.get_tracking_uri(), budget, finished, skipped,
                                  failed, time.perf_counter() - started)
    log(f"reproduction {parent_id}: {len(finished)} runs recorded, {len(skipped)} already there, {len(failed)} failed, "
        f"{summary.seconds:.0f}s; {budget.describe()}")
    return summary
