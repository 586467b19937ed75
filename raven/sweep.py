"""Hyper-parameter sweeps: Ray Tune runs the trials, Optuna proposes them, MLflow records them.

One sweep searches one hyper-parameter of one method (RAVEN's sigma_aug, the Smooth
Encoder's eta; entry scripts in sweeps/). The pieces:

* `sweep_trial`, a Ray Tune function trainable wrapping `raven.train.train`: a per-epoch
  callback reports the epoch's metrics (and the Ray node it ran on, `node_id`) with a Tune
  checkpoint (the trial's checkpoint.pt and the reported history), and a restored trial
  copies its Tune checkpoint back (or a newer complete one it finds in storage) and resumes
  training exactly where it stopped. A trial that fails (a lost node, a crashed worker) is
  restarted that way, on any node, up to `--max-failures` times (default 3); a killed driver
  is continued with `--resume` (runs of trials Tune had not saved yet are deleted from MLflow,
  new trials take their place).
* the selection objective `val_robust_accuracy`, computed on the VALIDATION split only:
  a linear probe fitted on training-split encodings (first `probe_limit` images), then PGD
  attacks (kl and w2, `steps` steps, delta in {0.05, 0.1, 0.2}) on the first `val_limit`
  validation images; the objective is the probe's accuracy on the adversarial images
  averaged over attacks and deltas (maximised). It is reported at the last epoch, or every
  `every` epochs. The test set is touched only by the final evaluation.
* Optuna's TPE sampler (seeded) through `ray.tune.search.optuna.OptunaSearch`; the paper's
  value(s) can be evaluated first; `--seeds N` repeats every configuration over N seeds
  (`Repeater`: the searcher sees the mean); `--asha` adds ASHA early stopping.
* the data is read once on the driver and put in Ray's object store once; every trial and
  evaluation task reads it from there.
* after the search, the full robustness evaluation (`raven.evaluate.evaluate_model`: both
  attacks, 50 steps, the paper's delta grid, the test set, FID, t-SNE) of the best
  configuration(s) runs as Ray tasks, on the cluster's GPUs when it has any; results come
  back to the driver, which writes every MLflow record (`raven.tracking`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from raven.config import DATASETS, PAPER_ETA, PAPER_SE_ETA_GRID, PAPER_SIGMA_AUG, ConfigError

OBJECTIVE = "val_robust_accuracy"
SPEC_NAME = "raven_sweep.json"
REPORTED_NAME = "reported.json"
TRIAL_INDEX = "__trial_index__"  # ray.tune.search.repeater.TRIAL_INDEX (kept here to avoid importing Ray)
# Appendix C.2's sigma grid (printed garbled as {0.1, 0.2, 0.4, 0.1, 0.2, 0.4, 1}; the selected
# values 0.01 and 0.04 show the first three are 0.01, 0.02, 0.04).
PAPER_SIGMA_GRID = (0.01, 0.02, 0.04, 0.1, 0.2, 0.4, 1.0)
# Metrics of the trainable's own reports that go into MLflow (Tune adds its bookkeeping keys).
_EPOCH_METRIC_PREFIXES = ("train_", "val_")
_EPOCH_METRIC_NAMES = ("epoch_seconds", "images_per_second")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SweepError(RuntimeError):
    """A sweep cannot start or continue; the message is shown as is (exit status 2)."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ObjectiveSettings:
    """The cheap validation-robustness objective (see the module docstring)."""

    attacks: tuple[str, ...] = ("kl", "w2")
    deltas: tuple[float, ...] = (0.05, 0.1, 0.2)
    steps: int = 10
    val_limit: int = 1000
    probe_limit: int = 10000
    every: int = 0  # 0: only at the last epoch
    seed: int = 0
    batch_size: int = 1000

    def eval_config(self):
        from raven.evaluate import EvalConfig

        return EvalConfig(attacks=tuple(self.attacks), deltas=tuple(self.deltas), steps=self.steps,
                          limit=self.val_limit, probe_limit=self.probe_limit, fid=False, tsne=False,
                          seed=self.seed, batch_size=self.batch_size)

    def due(self, epoch: int, epochs: int, last: bool = False) -> bool:
        return last or epoch >= epochs or (self.every > 0 and epoch % self.every == 0)


def validation_objective(model, splits, settings: ObjectiveSettings) -> dict[str, float]:
    """val_robust_accuracy (mean probe accuracy over attacks x deltas on validation images) and its parts.

    The probe is fitted on the first `probe_limit` training-split images, the attacks run on
    the first `val_limit` validation images; the test split is never read.
    """
    from raven.evaluate import probe_and_attack

    out = probe_and_attack(model, splits.train_x, splits.train_y, splits.val_x, splits.val_y,
                           settings.eval_config())
    metrics = {"val_clean_accuracy": float(out["clean_accuracy"])}
    values = []
    for kind, by_delta in out["adversarial_accuracy"].items():
        for key, acc in by_delta.items():
            metrics[f"val_adv_acc_{kind}_delta_{key}"] = float(acc)
            values.append(float(acc))
    metrics[OBJECTIVE] = sum(values) / len(values)
    return metrics


@dataclass
class SweepSpec:
    """Everything that defines a sweep; saved as raven_sweep.json in its Tune folder and reused by --resume."""

    kind: str  # entry script: "sigma_aug" or "se_eta"
    name: str  # Tune experiment name = MLflow parent run name and raven.sweep_name tag
    method: str
    dataset: str
    param: str  # the searched TrainConfig field
    space: dict[str, Any]  # {"type": "loguniform", "low", "high"} or {"type": "choice", "values"}
    initial: list[float]  # values evaluated before the sampler's own proposals
    train: dict[str, Any]  # fixed TrainConfig fields
    num_samples: int
    seeds: int = 1
    seed: int = 0
    objective: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # EvalConfig fields
    evaluate_top: int = 1
    asha: bool = False
    grace_period: int = 1
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 0.25 when the cluster has GPUs, else 0
    eval_cpus: float | None = None  # None: cpus_per_trial
    eval_gpus: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_failures: int = 3
    storage_path: str = "ray_results"
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "raven-sweeps"
    smoke: bool = False
    code_version: str = "unknown"
    created: str = ""

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def objective_settings(self) -> ObjectiveSettings:
        values = dict(self.objective)
        for key in ("attacks", "deltas"):
            if key in values:
                values[key] = tuple(values[key])
        return ObjectiveSettings(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SweepSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self) -> Path:
        path = self.experiment_dir / SPEC_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, experiment_dir: str | os.PathLike) -> "SweepSpec":
        return cls.from_dict(json.loads((Path(experiment_dir) / SPEC_NAME).read_text()))

    def mlflow_params(self) -> dict[str, Any]:
        """The parent run's parameters: search space, budget, fixed training settings, code version."""
        params: dict[str, Any] = {
            "sweep.kind": self.kind, "method": self.method, "dataset": self.dataset,
            "search.param": self.param, "search.sampler": f"optuna TPE (seed {self.seed})",
            "search.initial": self.initial or "none",
            "budget.num_samples": self.num_samples, "budget.seeds": self.seeds,
            "budget.trials": self.num_samples * self.seeds, "budget.asha": self.asha,
            "budget.max_concurrent": self.max_concurrent or "auto",
            "resources.cpus_per_trial": self.cpus_per_trial,
            "resources.gpus_per_trial": "auto" if self.gpus_per_trial is None else self.gpus_per_trial,
            "evaluate_top": self.evaluate_top, "smoke": self.smoke, "code_version": self.code_version,
            "selection_metric": OBJECTIVE, "selection_split": "validation",
        }
        for key, value in self.space.items():
            params[f"search.space.{key}"] = value
        for key, value in self.train.items():
            params[f"train.{key}"] = value
        for key, value in self.objective.items():
            params[f"objective.{key}"] = value
        for key, value in self.evaluation.items():
            params[f"evaluation.{key}"] = value
        return params


def trial_train_config(spec: SweepSpec, config: dict[str, Any]):
    """The TrainConfig of one trial: fixed settings + the sampled value + seed (base seed + repeat index)."""
    from raven.config import TrainConfig

    values = dict(spec.train)
    values.update(method=spec.method, dataset=spec.dataset)
    values[spec.param] = float(config[spec.param])
    values["seed"] = int(spec.seed) + int(config.get(TRIAL_INDEX, 0) or 0)
    return TrainConfig.from_dict(values)


def trial_params(spec: SweepSpec, config: dict[str, Any], trial_id: str) -> dict[str, Any]:
    params = trial_train_config(spec, config).to_dict()
    params["trial_id"] = trial_id
    params["repeat"] = int(config.get(TRIAL_INDEX, 0) or 0)
    return params


def trial_label(spec: SweepSpec, config: dict[str, Any], trial_id: str | None = None) -> str:
    text = f"{spec.param}={float(config[spec.param]):.4g}"
    if spec.seeds > 1:
        text += f" seed={int(spec.seed) + int(config.get(TRIAL_INDEX, 0) or 0)}"
    return f"{text} [{trial_id}]" if trial_id else text


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainable's own numeric metrics from a Tune result (Tune's bookkeeping keys dropped)."""
    out = {}
    for key, value in result.items():
        if (key.startswith(_EPOCH_METRIC_PREFIXES) or key in _EPOCH_METRIC_NAMES) and \
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_name(trial) -> str:
    param = next((k for k in trial.config if k != TRIAL_INDEX), None)
    if param is None:
        return f"trial_{trial.trial_id}"
    text = f"{param}={float(trial.config[param]):.3g}"
    if TRIAL_INDEX in trial.config:
        text += f"_r{trial.config[TRIAL_INDEX]}"
    return f"{text}_{trial.trial_id}"


# ----------------------------------------------------------------------------- the trainable


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _newest_saved_checkpoint(trial_dir: Path, after_epoch: int) -> Path | None:
    """A complete checkpoint folder of this trial newer than `after_epoch`, if storage holds one.

    Tune registers a reported checkpoint only when a later step of its loop processes it,
    so a driver stopped in between (Ctrl-C right after an epoch, or killed) restores the
    previous one, or none, although the newer files are in storage. Only filesystem
    storage is scanned; a folder is used when its checkpoint.pt loads.
    """
    from raven.train import CHECKPOINT_NAME, load_state

    if not trial_dir.is_dir():
        return None
    found = []
    for folder in trial_dir.glob("checkpoint_*"):
        try:
            history = json.loads((folder / REPORTED_NAME).read_text())
            epoch = int(history[-1]["epoch"]) if history else 0
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
        if epoch > after_epoch and (folder / CHECKPOINT_NAME).is_file():
            found.append((epoch, folder))
    for epoch, folder in sorted(found, reverse=True):
        try:
            state = load_state(folder / CHECKPOINT_NAME)
        except Exception:  # noqa: BLE001 - a partly copied checkpoint: try an older one
            continue
        if int(state.get("epoch", -1)) == epoch:
            return folder
    return None


def sweep_trial(config: dict[str, Any], splits, spec: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one configuration, report every epoch with a checkpoint.

    `splits` is the DataSplits from the object store (passed with tune.with_parameters);
    `spec` the SweepSpec as a dict. A trial restored by Tune (resume, node failure) copies
    its latest Tune checkpoint into a fresh folder and `train(..., resume=True)` continues
    from that epoch with the same RNG state.
    """
    import ray
    import torch
    from ray import tune

    from raven.train import resolve_device, should_stop, train

    node_id = ray.get_runtime_context().get_node_id()
    sweep = SweepSpec.from_dict(spec)
    train_config = trial_train_config(sweep, config)
    objective = sweep.objective_settings
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    device = resolve_device("auto")
    if splits.device != device:
        splits = splits.to(device)
    work = Path(tempfile.mkdtemp(prefix="raven-trial-"))
    try:
        reported: list[dict[str, float]] = []
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                for item in Path(folder).iterdir():
                    if item.is_file():
                        shutil.copy2(item, work / item.name)
            if (work / REPORTED_NAME).is_file():
                reported = json.loads((work / REPORTED_NAME).read_text())
        newer = _newest_saved_checkpoint(sweep.experiment_dir / f"trial_{tune.get_context().get_trial_id()}",
                                         after_epoch=len(reported))
        if newer is not None:
            for item in newer.iterdir():
                if item.is_file():
                    shutil.copy2(item, work / item.name)
            reported = json.loads((work / REPORTED_NAME).read_text())
        sent = 0

        def on_epoch(report) -> None:
            nonlocal sent
            metrics = {k: float(v) for k, v in report.metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            metrics["epoch"] = report.epoch
            metrics["node_id"] = node_id  # the Ray node this epoch ran on (MLflow tags raven.node_id(s))
            history = reported + [metrics]
            if objective.due(report.epoch, train_config.epochs, last=should_stop(train_config, history)):
                metrics.update(validation_objective(report.model, splits, objective))
            reported.append(metrics)
            _write_json(reported, work / REPORTED_NAME)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(work)))
            sent += 1

        train(train_config, splits=splits, device=device, out_dir=work, callbacks=[on_epoch], resume=True,
              progress=False)
        if sent == 0 and reported:
            # Restored from the checkpoint of its last epoch (the driver stopped before it
            # recorded the trial as finished): report the final result again.
            tune.report(reported[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- Ray


def _address_host_port(address: str) -> tuple[str, int] | None:
    text = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str | None, timeout: float = 5.0) -> str | None:
    """Fail fast (SweepError) when `address` (or RAY_ADDRESS for 'auto') names an unreachable cluster.

    Returns the address to pass to ray.init: None (start a local Ray) or the given one.
    """
    if address is None:
        return None
    target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
    if not target or target == "auto":
        return address  # ray.init finds a cluster started on this machine, or says none is running
    host_port = _address_host_port(target)
    if host_port is None:
        raise SweepError(f"cannot read the Ray address {target!r}; use HOST:PORT (the head's GCS port) or auto")
    try:
        with socket.create_connection(host_port, timeout=timeout):
            pass
    except OSError as exc:
        source = " (from RAY_ADDRESS)" if address == "auto" else ""
        raise SweepError(f"cannot reach a Ray cluster at {target}{source}: {exc.strerror or exc}; "
                         "start one with `ray start --head`, or leave --address out to start a local Ray") from None
    return address


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def connect_ray(address: str | None) -> dict[str, Any]:
    """ray.init: a new local Ray (this machine's resources) for None, else join the cluster ('auto' or HOST:PORT).

    Token authentication stays on. A local Ray enables it itself (Ray 2.60 default) and
    creates ~/.ray/auth_token when no token is given (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH).
    Joining a cluster uses the token from the same places; Ray turns token mode on by
    itself only for address 'auto', so for an explicit address it is turned on here when a
    token is available and RAY_AUTH_MODE is unset.
    """
    import logging

    import ray

    address = check_address(address)
    if address is None:
        if os.environ.pop("RAY_ADDRESS", None):
            print("raven sweep: RAY_ADDRESS ignored (no --address): starting a local Ray; "
                  "pass --address auto to join that cluster", file=sys.stderr)
    elif address != "auto" and "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        # "local" always starts a new Ray; None would join a cluster already started on this machine.
        ray.init(address="local" if address is None else address, logging_level=logging.WARNING,
                 log_to_driver=True)
    except ConnectionError as exc:
        raise SweepError(f"cannot join the Ray cluster ({address}): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - authentication and similar start-up failures, one line
        if type(exc).__name__ in ("AuthenticationError", "RaySystemError"):
            raise SweepError(f"Ray refused the connection: {str(exc).splitlines()[0]}") from None
        raise
    resources = ray.cluster_resources()
    return {"address": ray.get_runtime_context().gcs_address, "cpus": resources.get("CPU", 0.0),
            "gpus": resources.get("GPU", 0.0), "nodes": len([n for n in ray.nodes() if n.get("Alive")])}


# ----------------------------------------------------------------------------- Tune


def _make_optuna_search_class():
    from ray.tune.search.optuna import OptunaSearch

    class ObjectiveOptunaSearch(OptunaSearch):
        """OptunaSearch that ignores epochs reported without the objective (it is computed every K epochs).

        Optuna only records intermediate values here (for pruners); the trial's value is its
        last result's objective, passed on completion.
        """

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, str) and self.metric in result:
                super().on_trial_result(trial_id, result)

    ObjectiveOptunaSearch.__module__ = __name__
    ObjectiveOptunaSearch.__qualname__ = "ObjectiveOptunaSearch"
    return ObjectiveOptunaSearch


def __getattr__(name: str):
    # Built on first use so that importing raven.sweep (argument checks) does not import Ray;
    # module-level lookup keeps the class picklable (Tune saves the searcher with the experiment).
    if name == "ObjectiveOptunaSearch":
        cls = _make_optuna_search_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _search_domain(space: dict[str, Any]):
    from ray import tune

    if space["type"] == "loguniform":
        return tune.loguniform(float(space["low"]), float(space["high"]))
    if space["type"] == "choice":
        return tune.choice([float(v) for v in space["values"]])
    raise ValueError(f"unknown search space type {space['type']!r}")


def build_tuner(spec: SweepSpec, splits_ref, resources: dict[str, Any], resume: bool):
    """A new Tuner, or the interrupted one restored from spec.experiment_dir when `resume`."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import Repeater

    from raven.tracking import MlflowTuneCallback, SweepTracker

    ObjectiveOptunaSearch = __getattr__("ObjectiveOptunaSearch")
    # Results without the objective (epochs before the last) are expected.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # The classic CLIReporter table (the newer output engine ignores progress reporters).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Save the experiment state (what --resume restores) every 5 s instead of Tune's adaptive
    # >= 10 s, so that a driver that dies (SIGKILL, lost head) loses less; an explicit value wins.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    gpus = spec.gpus_per_trial
    if gpus is None:
        gpus = 0.25 if resources.get("gpus", 0) > 0 else 0.0
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, splits=splits_ref, spec=spec.to_dict()),
        {"cpu": spec.cpus_per_trial, "gpu": gpus})
    experiment_dir = str(spec.experiment_dir.resolve())
    if resume and tune.Tuner.can_restore(experiment_dir):
        return tune.Tuner.restore(experiment_dir, trainable=trainable, resume_errored=True, restart_errored=False)

    searcher = ObjectiveOptunaSearch(metric=OBJECTIVE, mode="max",
                            points_to_evaluate=[{spec.param: float(v)} for v in spec.initial] or None,
                            sampler=optuna.samplers.TPESampler(seed=spec.seed))
    if spec.seeds > 1:
        searcher = Repeater(searcher, repeat=spec.seeds, set_index=True)
    scheduler = None
    if spec.asha:
        epochs = int(spec.train["epochs"])
        scheduler = ASHAScheduler(time_attr="epoch", metric=OBJECTIVE, mode="max", max_t=epochs,
                                  grace_period=min(spec.grace_period, epochs), reduction_factor=2)
    parameter_columns = {spec.param: spec.param}
    if spec.seeds > 1:
        parameter_columns[TRIAL_INDEX] = "repeat"
    reporter = tune.CLIReporter(
        parameter_columns=parameter_columns,
        metric_columns={"epoch": "epoch", "val_elbo": "val_elbo", OBJECTIVE: OBJECTIVE},
        max_report_frequency=5 if spec.smoke else 30, metric=OBJECTIVE, mode="max", sort_by_metric=True,
        max_progress_rows=30)
    tracker = SweepTracker(spec.tracking_uri, spec.experiment, spec.name, pending_path=pending_path(spec))
    return tune.Tuner(
        trainable,
        param_space={spec.param: _search_domain(spec.space)},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.num_samples * spec.seeds,
                                    max_concurrent_trials=spec.max_concurrent,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(Path(spec.storage_path).resolve()),
            callbacks=[MlflowTuneCallback(tracker, spec.to_dict())], progress_reporter=reporter, verbose=1,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )


def pending_path(spec: SweepSpec) -> Path:
    """Where MLflow writes that could not be delivered yet wait (replayed by --resume)."""
    from raven.tracking import PENDING_NAME

    return spec.experiment_dir.resolve() / PENDING_NAME


def _forget_lost_trials(spec: SweepSpec, tracker, log: Callable[[str], None]) -> None:
    """Delete the MLflow runs of trials the saved Tune state does not know (before --resume restores it).

    A driver that dies (SIGKILL, a lost head) may have started trials after Tune last saved its
    experiment state; the restored sweep does not know them and runs new trials in their place,
    so their runs would stay behind as duplicates of nothing. They are deleted (soft: `mlflow
    runs restore --run-id ID` brings one back).
    """
    from ray.tune import ExperimentAnalysis, Tuner

    try:
        known: set[str] = set()  # no saved state at all: the resumed sweep starts over (build_tuner)
        if Tuner.can_restore(str(spec.experiment_dir.resolve())):
            known = {t.trial_id for t in ExperimentAnalysis(str(spec.experiment_dir.resolve())).trials}
        runs = tracker.retrying("reading the trial runs", tracker.trial_runs)
        for trial_id, run_id in runs.items():
            if trial_id not in known:
                tracker.retrying("deleting a lost trial's run", lambda: tracker.client.delete_run(run_id))
                log(f"trial {trial_id} started after Tune last saved the sweep's state and is not resumed "
                    f"(a new trial takes its place); its MLflow run {run_id} is deleted")
    except Exception as exc:  # noqa: BLE001 - the sweep continues; the record may keep an extra run
        log(f"warning: runs of trials lost with the driver not checked: {type(exc).__name__}: {exc}")


def finished_trials(spec: SweepSpec) -> int:
    """Trials that ended (TERMINATED or ERROR) in the experiment state Tune saved last.

    After an interrupt (SIGINT) Tune saves the state with the running trials still RUNNING
    (that is what --resume continues) and only then stops them, so the in-memory results
    would count them as terminated; the saved state tells them apart.
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(spec.experiment_dir.resolve()))
    return sum(1 for trial in analysis.trials if trial.status in ("TERMINATED", "ERROR"))


def trial_table(results, spec: SweepSpec, tracker=None) -> "pd.DataFrame":  # noqa: F821
    """One row per trial, in creation order: id, status, value, seed, epochs, objective and parts, checkpoint, run."""
    import pandas as pd

    runs = {}
    if tracker is not None:
        try:
            runs = tracker.retrying("reading the trial runs", tracker.trial_runs)
        except Exception as exc:  # noqa: BLE001 - the table is written without the run ids
            print(f"raven sweep: warning: MLflow trial runs not read: {type(exc).__name__}: {exc}", file=sys.stderr)
    rows = []
    for number, result in enumerate(results):
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        config = result.config or metrics.get("config") or {}
        row = {
            "number": number, "trial_id": trial_id,
            "status": "ERROR" if result.error else ("TERMINATED" if metrics.get("done") or metrics.get("epoch") else "?"),
            spec.param: float(config[spec.param]) if spec.param in config else float("nan"),
            "seed": int(spec.seed) + int(config.get(TRIAL_INDEX, 0) or 0),
            "epochs": metrics.get("epoch"),
            OBJECTIVE: metrics.get(OBJECTIVE, float("nan")),
            "val_clean_accuracy": metrics.get("val_clean_accuracy", float("nan")),
            "val_elbo": metrics.get("val_elbo", float("nan")),
            "val_mse_255": metrics.get("val_mse_255", float("nan")),
            "checkpoint": result.checkpoint.path if result.checkpoint is not None else "",
            "mlflow_run_id": runs.get(trial_id, ""),
            "error": str(result.error).splitlines()[0][:200] if result.error else "",
        }
        rows.append(row)
    return pd.DataFrame(rows)


def ranked_configurations(table, spec: SweepSpec):
    """Completed trials grouped by searched value (seeds averaged), best objective first."""
    done = table[(table["status"] == "TERMINATED") & table[OBJECTIVE].notna()]
    if done.empty:
        return done.groupby(spec.param)[OBJECTIVE].agg(["mean", "std", "count"])
    grouped = done.groupby(spec.param)[OBJECTIVE].agg(["mean", "std", "count"])
    return grouped.sort_values("mean", ascending=False)


def plot_history(table, spec: SweepSpec, path: str | os.PathLike) -> Path:
    """Optuna-style optimisation history (objective per trial, best so far) and value vs objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ok = table[table[OBJECTIVE].notna()]
    ax1.scatter(ok["number"], ok[OBJECTIVE], color="tab:blue", label="trial", zorder=3)
    if not ok.empty:
        best = np.maximum.accumulate(ok[OBJECTIVE].to_numpy())
        ax1.step(ok["number"], best, where="post", color="tab:red", label="best so far")
    ax1.set_xlabel("trial (creation order)")
    ax1.set_ylabel(OBJECTIVE)
    ax1.set_title("optimisation history (Optuna TPE)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.scatter(ok[spec.param], ok[OBJECTIVE], c=ok["number"], cmap="viridis", zorder=3)
    if spec.space.get("type") == "loguniform" or (len(ok) and (ok[spec.param] > 0).all()):
        ax2.set_xscale("log")
    ax2.set_xlabel(spec.param)
    ax2.set_ylabel(OBJECTIVE)
    ax2.set_title(f"{spec.param} vs validation robust accuracy")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{spec.name}: {spec.method} on {spec.dataset}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- evaluation


def _evaluate_task(checkpoint_bytes: bytes, splits, evaluation: dict[str, Any], label: str,
                   threads: int) -> dict[str, Any]:
    """Body of the Ray task: the full evaluation of one checkpoint; artifacts come back as bytes."""
    import torch

    from raven import plots
    from raven.evaluate import CURVES_PNG, EvalConfig, evaluate_model
    from raven.train import CHECKPOINT_NAME, load_checkpoint, resolve_device

    torch.set_num_threads(max(1, threads))
    device = resolve_device("auto")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raven-eval-") as tmp:
        file = Path(tmp) / CHECKPOINT_NAME
        file.write_bytes(checkpoint_bytes)
        model = load_checkpoint(file, map_location=device)
        if splits.device != device:
            splits = splits.to(device)
        out = Path(tmp) / "evaluation"
        result = evaluate_model(model, splits, EvalConfig(**evaluation), out_dir=out, label=label)
        paths = list(result.artifacts)
        paths.append(plots.plot_accuracy_curves([(label, result.to_json())], out / CURVES_PNG,
                                                title=f"{label}: test robustness"))
        artifacts = {p.name: p.read_bytes() for p in paths if Path(p).is_file()}
    result.artifacts = []
    try:
        import ray

        node = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        node = socket.gethostname()
    return {"result": result, "artifacts": artifacts, "device": str(device), "node": node,
            "seconds": time.perf_counter() - started}


def evaluate_trials(spec: SweepSpec, results, table, splits_ref, tracker, resources: dict[str, Any],
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Evaluate the trials of the top-`evaluate_top` configurations as Ray tasks; log each on the driver.

    Trials with a FINISHED evaluation run are not evaluated again (their metrics are read back).
    """
    import ray
    import torch

    from raven.evaluate import EvalResult, log_to_mlflow
    from raven.train import CHECKPOINT_NAME, load_checkpoint

    ranked = ranked_configurations(table, spec)
    if spec.evaluate_top <= 0 or ranked.empty:
        return []
    chosen_values = list(ranked.index[:spec.evaluate_top])
    chosen = table[(table[spec.param].isin(chosen_values)) & (table["status"] == "TERMINATED")]
    by_id = {r.metrics.get("trial_id"): r for r in results if r.metrics}
    gpus = spec.eval_gpus if spec.eval_gpus is not None else (1.0 if resources.get("gpus", 0) > 0 else 0.0)
    cpus = spec.eval_cpus if spec.eval_cpus is not None else spec.cpus_per_trial
    remote = ray.remote(_evaluate_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    evaluated: list[dict[str, Any]] = []
    pending: dict[Any, dict[str, Any]] = {}
    out_root = spec.experiment_dir.resolve() / "evaluations"
    for _, row in chosen.iterrows():
        trial_id = row["trial_id"]
        run_id, status = tracker.retrying("reading the evaluation runs", lambda: tracker.evaluation_run(trial_id))
        if status == "FINISHED":
            metrics = tracker.client.get_run(run_id).data.metrics
            evaluated.append({"trial_id": trial_id, "run_id": run_id, "metrics": metrics, "row": row, "reused": True})
            log(f"evaluation of trial {trial_id} already in MLflow run {run_id}; not repeated")
            continue
        result = by_id.get(trial_id)
        if result is None or result.checkpoint is None:
            log(f"trial {trial_id} has no checkpoint; not evaluated")
            continue
        with result.checkpoint.as_directory() as folder:
            checkpoint_bytes = (Path(folder) / CHECKPOINT_NAME).read_bytes()
        label = f"{spec.method} {trial_label(spec, result.config, trial_id)}"
        ref = remote.remote(checkpoint_bytes, splits_ref, spec.evaluation, label, max(1, int(cpus)))
        pending[ref] = {"trial_id": trial_id, "row": row, "label": label, "checkpoint_bytes": checkpoint_bytes,
                        "config": result.config}
        log(f"evaluating trial {trial_id} ({label}) as a Ray task (cpus {cpus}, gpus {gpus})")
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        info = pending.pop(done[0])
        payload = ray.get(done[0])
        result: EvalResult = payload["result"]
        folder = out_root / info["trial_id"]
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name, data in payload["artifacts"].items():
            (folder / name).write_bytes(data)
        (folder / CHECKPOINT_NAME).write_bytes(info["checkpoint_bytes"])
        result.artifacts = [folder / name for name in payload["artifacts"]]
        # A retry after a lost connection replaces the half-written evaluation run (new_evaluation_run).
        run_id = tracker.retrying(
            f"logging the evaluation of trial {info['trial_id']}",
            lambda: _log_evaluation(spec, tracker, info, result, payload, folder, log_to_mlflow, load_checkpoint,
                                    torch))
        evaluated.append({"trial_id": info["trial_id"], "run_id": run_id, "metrics": result.metrics(),
                          "row": info["row"], "result": result, "reused": False})
        log(f"evaluated trial {info['trial_id']} on {payload['node']} ({payload['device']}) in "
            f"{payload['seconds']:.0f}s: clean {result.clean_accuracy:.4f}; MLflow run {run_id}")
    return evaluated


def _log_evaluation(spec, tracker, info, result, payload, folder, log_to_mlflow, load_checkpoint, torch) -> str:
    import mlflow
    import mlflow.pytorch

    from raven.tracking import CHECKPOINT, MODEL_URI, TRIAL_RUN_ID
    from raven.train import CHECKPOINT_NAME

    params = trial_params(spec, info["config"], info["trial_id"])
    run_id = tracker.new_evaluation_run(info["trial_id"], f"eval {trial_label(spec, info['config'], info['trial_id'])}",
                                        params)
    mlflow.set_tracking_uri(spec.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        log_to_mlflow(result)
        mlflow.log_artifact(str(folder / CHECKPOINT_NAME), artifact_path="checkpoint")
        model = load_checkpoint(folder / CHECKPOINT_NAME, map_location="cpu")
        model_info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "raven"])
        mlflow.set_tags({MODEL_URI: model_info.model_uri, "raven.eval_device": payload["device"],
                         "raven.eval_node": payload["node"], CHECKPOINT: str(folder / CHECKPOINT_NAME),
                         TRIAL_RUN_ID: tracker.trial_run(info["trial_id"])})
        mlflow.log_metric("eval_seconds", payload["seconds"])
    return run_id


# ----------------------------------------------------------------------------- driver


def _finish_parent(tracker, parent_id: str, status: str, log: Callable[[str], None]) -> None:
    try:
        tracker.retrying("closing the parent run", lambda: tracker.finish(parent_id, status), timeout=30.0)
    except Exception as exc:  # noqa: BLE001 - never hides the reason the sweep stopped
        log(f"warning: MLflow parent run {parent_id} not marked {status}: {type(exc).__name__}: {exc}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(spec: SweepSpec, address: str | None, data_dir: str | None, resume: bool,
              log: Callable[[str], None] | None = None) -> int:
    """Run (or, with resume, continue) the sweep: 0 when done, 1 when no trial finished, 130 when interrupted."""
    log = log or (lambda line: print(f"raven sweep: {line}", file=sys.stderr, flush=True))
    from raven.data import DataError, load_splits
    from raven.tracking import SweepTracker

    started = time.perf_counter()
    try:
        splits = load_splits(spec.dataset, data_dir, "cpu", validation_size=int(spec.train.get("validation_size", 5000)))
    except DataError as exc:
        raise SweepError(str(exc)) from None
    import ray

    resources = connect_ray(address)
    try:
        tracker = SweepTracker(spec.tracking_uri, spec.experiment, spec.name, pending_path=pending_path(spec),
                               log=log)
        try:
            parent_id, created = tracker.start_parent(spec.mlflow_params(), tags={
                "raven.code_version": spec.code_version, "raven.sweep_kind": spec.kind,
                "raven.experiment_dir": str(spec.experiment_dir.resolve())})
            tracker.set_tags(parent_id, {"raven.ray_cluster": resources["address"],
                                         "raven.ray_nodes": resources["nodes"]})
        except Exception as exc:  # noqa: BLE001 - any tracking-store failure, one line
            raise SweepError(f"cannot write to the MLflow tracking store {spec.tracking_uri}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        spec.save()
        replayed = tracker.load_pending()
        if replayed:  # writes a previous driver could not deliver (the store was down when it stopped)
            log(f"replaying {replayed} MLflow write(s) left by the interrupted driver")
            if not tracker.drain():
                raise SweepError(f"the MLflow tracking store {spec.tracking_uri} stopped answering while the "
                                 f"writes left by the interrupted driver were replayed; they are kept in "
                                 f"{pending_path(spec)}: run --resume again once it is back")
        log(f"{'continuing' if resume else 'starting'} sweep {spec.name}: {spec.method} on {spec.dataset}, "
            f"{spec.param} {spec.space}, {spec.num_samples} samples x {spec.seeds} seed(s), "
            f"{spec.train['epochs']} epoch(s); Tune folder {spec.experiment_dir.resolve()}; "
            f"MLflow {spec.tracking_uri} experiment {spec.experiment!r} parent run {parent_id}"
            f"{'' if created else ' (existing)'}")
        log(f"Ray cluster {resources['address']}: {resources['nodes']} node(s), {resources['cpus']:g} CPUs, "
            f"{resources['gpus']:g} GPUs")
        if resume:
            _forget_lost_trials(spec, tracker, log)
        splits_ref = ray.put(splits)  # once; every trial and evaluation task reads this object
        del splits
        tuner = build_tuner(spec, splits_ref, resources, resume)
        results = tuner.fit()
        # Writes the callback could not deliver during the sweep (the store was unreachable).
        tracker.load_pending()
        tracker.drain()
        expected = spec.num_samples * spec.seeds
        finished = finished_trials(spec)
        if finished < expected:
            _finish_parent(tracker, parent_id, "KILLED", log)
            log(f"interrupted with {finished} of {expected} trials finished; continue with: "
                f"python sweeps/{spec.kind}.py --resume --name {spec.name} --storage-path {spec.storage_path}")
            return 130
        table = trial_table(results, spec, tracker)
        ranked = ranked_configurations(table, spec)
        try:
            evaluations = evaluate_trials(spec, results, table, splits_ref, tracker, resources, log)
        except KeyboardInterrupt:
            _finish_parent(tracker, parent_id, "KILLED", log)
            raise
        except Exception:
            _finish_parent(tracker, parent_id, "FAILED", log)
            raise
    finally:
        ray.shutdown()

    out = spec.experiment_dir.resolve()
    csv_path = out / "trials.csv"
    table.to_csv(csv_path, index=False)
    history_png = plot_history(table, spec, out / "optimization_history.png")
    artifacts = [csv_path, history_png, out / SPEC_NAME]
    summary_metrics: dict[str, float] = {"trials_completed": float((table["status"] == "TERMINATED").sum()),
                                         "trials_errored": float((table["status"] == "ERROR").sum())}
    if not ranked.empty:
        summary_metrics[f"best_{OBJECTIVE}"] = float(ranked["mean"].iloc[0])
        summary_metrics[f"best_{spec.param}"] = float(ranked.index[0])
    evaluation_rows = []
    for item in evaluations:
        row = {"trial_id": item["trial_id"], spec.param: item["row"][spec.param], "seed": item["row"]["seed"],
               OBJECTIVE: item["row"][OBJECTIVE], "evaluation_run_id": item["run_id"]}
        row.update(item["metrics"])
        evaluation_rows.append(row)
    if evaluation_rows:
        import pandas as pd

        eval_csv = out / "evaluations.csv"
        pd.DataFrame(evaluation_rows).to_csv(eval_csv, index=False)
        artifacts.append(eval_csv)
        curves = [(f"{spec.param}={float(i['row'][spec.param]):.4g}", i["result"].to_json())
                  for i in evaluations if "result" in i]
        if curves:
            from raven import plots

            artifacts.append(plots.plot_accuracy_curves(curves, out / "evaluated_robustness_curves.png",
                                                        title=f"{spec.name}: test robustness of the best"))
        best = evaluations[0]["metrics"]
        adv = [v for k, v in best.items() if k.startswith("adv_acc_") and not k.endswith("_delta_0")]
        if "clean_accuracy" in best:
            summary_metrics["best_test_clean_accuracy"] = float(best["clean_accuracy"])
        if adv:
            summary_metrics["best_test_mean_adv_accuracy"] = float(sum(adv) / len(adv))
    def record_parent() -> None:
        tracker.log_metrics(parent_id, summary_metrics)
        tracker.log_artifacts(parent_id, artifacts)
        tracker.finish(parent_id, "FINISHED")

    try:
        tracker.retrying("recording the sweep's results", record_parent)
    except Exception as exc:  # noqa: BLE001 - the results are on disk; say where
        log(f"warning: the sweep's results could not be recorded in MLflow ({type(exc).__name__}: {exc}); "
            f"they are in {out}")

    _print_summary(spec, table, ranked, evaluations, parent_id, time.perf_counter() - started)
    if ranked.empty:
        log("no trial finished with an objective value (see the errors above and in trials.csv)")
        return 1
    return 0


def _print_summary(spec, table, ranked, evaluations, parent_id, seconds) -> None:
    import pandas as pd

    from raven.evaluate import format_summary

    columns = ["number", "trial_id", "status", spec.param, "seed", "epochs", OBJECTIVE, "val_clean_accuracy",
               "val_elbo"]
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(f"\nTrials of sweep {spec.name} ({len(table)}):")
        print(table[columns].to_string(index=False))
    if ranked.empty:
        print("\nNo trial completed with an objective value.")
    else:
        best_value = ranked.index[0]
        stats = ranked.iloc[0]
        spread = f" +- {stats['std']:.4f} over {int(stats['count'])} seeds" if stats["count"] > 1 else ""
        print(f"\nBest configuration: {spec.method} {spec.param}={best_value:.6g} on {spec.dataset}: "
              f"{OBJECTIVE} {stats['mean']:.4f}{spread} (validation split)")
    results = [e["result"] for e in evaluations if "result" in e]
    if results:
        print("\nTest-set evaluation of the best configuration(s):")
        print(format_summary(results))
    for item in evaluations:
        if item.get("reused"):
            print(f"(trial {item['trial_id']}: evaluation read back from MLflow run {item['run_id']})")
    print(f"\nMLflow: {spec.tracking_uri}, experiment {spec.experiment!r}, parent run {parent_id}; "
          f"Tune results: {spec.experiment_dir.resolve()}; {seconds:.0f}s")


# ----------------------------------------------------------------------------- command line


class SweepArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`PROG: error: ...`, exit status 2) and no usage dump."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


SMOKE = {
    "num_samples": 2, "epochs": 1, "limit": 1000, "seeds": 1, "max_concurrent": 2, "evaluate_top": 1,
    "objective_images": 200, "objective_steps": 5, "objective_probe_images": 1000,
    "eval_limit": 200, "eval_steps": 10, "eval_deltas": (0.0, 0.1, 0.2), "eval_probe_images": 1000,
    "fid": False, "tsne": True, "tsne_points": 100,
}
DEFAULTS = {
    "num_samples": 20, "epochs": 20, "limit": None, "seeds": 1, "max_concurrent": None, "evaluate_top": 1,
    "objective_images": 1000, "objective_steps": 10, "objective_probe_images": 10000,
    "eval_limit": None, "eval_steps": 50, "eval_deltas": None, "eval_probe_images": None,
    "fid": True, "tsne": True, "tsne_points": 1000,
}
SMOKE_HELP = ("a budget that finishes in about two minutes on a 2-core CPU machine: 2 trials, 1 epoch on "
              "1000 images; objective on 200 validation images with 5 PGD steps (probe on 1000); evaluation of "
              "the best trial on 200 test images, 10 steps, delta in {0, 0.1, 0.2}, probe on 1000 images, t-SNE "
              "of 100 points and no FID. Explicit flags still win")


def _deltas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_common_arguments(parser: argparse.ArgumentParser, experiment: str) -> None:
    g = parser.add_argument_group("cluster and storage")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: 'auto' (RAY_ADDRESS, else a cluster started on this machine) or "
                        "HOST:PORT; absent: start a local Ray with this machine's resources")
    g.add_argument("--storage-path", default="ray_results", help="Tune results folder (default ./ray_results)")
    g.add_argument("--name", default=None,
                   help="sweep name (Tune experiment, MLflow parent run); default KIND-DATASET-TIMESTAMP. "
                        "With --resume: the sweep to continue (default: the latest in --storage-path)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume from "
                        "their checkpoints, MLflow runs are reused; the saved settings of that sweep apply")
    g.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default sqlite:///mlflow.db in this folder, artifacts in ./mlruns)")
    g.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment})")
    g.add_argument("--data-dir", default=None, help="data root (default: $RAVEN_DATA_DIR, else ~/.cache/raven/data)")
    g = parser.add_argument_group("budget")
    g.add_argument("--dataset", default="mnist", choices=DATASETS)
    g.add_argument("--num-samples", type=int, default=None, help="configurations to try (default 20)")
    g.add_argument("--seeds", type=int, default=None,
                   help="training seeds per configuration; the searcher sees their mean (default 1)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 20)")
    g.add_argument("--limit", type=int, default=None, help="train on the first N training images (default all)")
    g.add_argument("--seed", type=int, default=0, help="base training seed and Optuna sampler seed (default 0)")
    g.add_argument("--asha", action="store_true", help="ASHA early stopping on the objective (computed every epoch)")
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    g.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    g = parser.add_argument_group("resources")
    g.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as resources allow)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    g.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial; fractions share one GPU between trials (default 0.25 on a cluster with "
                        "GPUs, else 0)")
    g.add_argument("--max-failures", type=int, default=3,
                   help="restarts of a failed trial (a lost node, a crashed worker) from its last checkpoint, "
                        "on any node (default 3; 0: a failure ends the trial)")
    g = parser.add_argument_group("selection objective (validation split)")
    g.add_argument("--objective-images", type=int, default=None, help="validation images attacked (default 1000)")
    g.add_argument("--objective-steps", type=int, default=None, help="PGD steps (default 10)")
    g.add_argument("--objective-probe-images", type=int, default=None,
                   help="training images for the probe (default 10000)")
    g.add_argument("--objective-every", type=int, default=None,
                   help="compute the objective every K epochs (default: last epoch only; 1 with --asha)")
    g = parser.add_argument_group("final evaluation (test split)")
    g.add_argument("--evaluate-top", type=int, default=None,
                   help="evaluate the best K configurations (all their seeds) in full (default 1; 0: none)")
    g.add_argument("--eval-limit", type=int, default=None, help="test images (default all 10000)")
    g.add_argument("--eval-steps", type=int, default=None, help="PGD steps (default 50)")
    g.add_argument("--eval-deltas", type=_deltas, default=None, help="attack budgets (default the paper's grid)")
    g.add_argument("--eval-gpus", type=float, default=None, help="GPUs per evaluation task (default 1 if any)")
    g.add_argument("--eval-cpus", type=float, default=None, help="CPUs per evaluation task (default --cpus-per-trial)")
    g.add_argument("--no-fid", dest="fid", action="store_false", default=None, help="skip FID")
    g.add_argument("--no-tsne", dest="tsne", action="store_false", default=None, help="skip the t-SNE plot")


def _pick(args: argparse.Namespace, key: str) -> Any:
    value = getattr(args, key, None)
    if value is not None:
        return value
    return (SMOKE if args.smoke else DEFAULTS)[key]


def validate_common(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject bad values in one line (parser.error: exit 2) before anything starts."""
    def at_least(key: str, low: int, flag: str | None = None) -> None:
        value = getattr(args, key, None)
        if value is not None and value < low:
            parser.error(f"{flag or '--' + key.replace('_', '-')} must be >= {low}, got {value}")

    for key in ("num_samples", "seeds", "epochs", "limit", "max_concurrent", "grace_period", "objective_images",
                "objective_steps", "objective_probe_images", "eval_limit", "eval_steps"):
        at_least(key, 1)
    for key in ("seed", "max_failures", "evaluate_top", "objective_every"):
        at_least(key, 0)
    if not (args.cpus_per_trial > 0 and math.isfinite(args.cpus_per_trial)):
        parser.error(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    for key in ("gpus_per_trial", "eval_gpus", "eval_cpus"):
        value = getattr(args, key)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {value}")
    if args.eval_deltas is not None:
        bad = [d for d in args.eval_deltas if not (0 <= d <= 1)]
        if bad:
            parser.error(f"--eval-deltas must lie in [0, 1], got {bad[0]}")
    if args.name is not None and not _NAME_PATTERN.match(args.name):
        parser.error(f"--name may hold letters, digits, '.', '_' and '-' only, got {args.name!r}")
    if args.address is not None:
        try:
            check_address(args.address)
        except SweepError as exc:
            parser.error(str(exc))


def common_spec(args: argparse.Namespace, kind: str, method: str, param: str, space: dict[str, Any],
                initial: Sequence[float], train_extra: dict[str, Any] | None = None) -> SweepSpec:
    """A new SweepSpec from validated flags (smoke defaults where a flag was not given)."""
    from raven.config import TrainConfig
    from raven.evaluate import EvalConfig
    from raven.tracking import git_version, resolve_tracking_uri

    epochs = _pick(args, "epochs")
    train = {"epochs": epochs, "limit": _pick(args, "limit"), **(train_extra or {})}
    # Fail here, in one line, on any bad training value (and on a bad searched value below).
    TrainConfig.from_dict({**train, "method": method, "dataset": args.dataset, param: float(initial[0])
                           if initial else 1.0})
    every = args.objective_every if args.objective_every is not None else (1 if args.asha else 0)
    objective = dataclasses.asdict(ObjectiveSettings(
        val_limit=_pick(args, "objective_images"), steps=_pick(args, "objective_steps"),
        probe_limit=_pick(args, "objective_probe_images"), every=every, seed=args.seed))
    evaluation = {"steps": _pick(args, "eval_steps"), "limit": _pick(args, "eval_limit"),
                  "probe_limit": _pick(args, "eval_probe_images"), "fid": _pick(args, "fid"),
                  "tsne": _pick(args, "tsne"), "tsne_points": _pick(args, "tsne_points"), "seed": args.seed}
    deltas = _pick(args, "eval_deltas")
    if deltas is not None:
        evaluation["deltas"] = list(deltas)
    EvalConfig(**evaluation)  # validates
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = args.name or f"{kind.replace('_', '-')}-{args.dataset}-{stamp}"
    return SweepSpec(
        kind=kind, name=name, method=method, dataset=args.dataset, param=param, space=space,
        initial=[float(v) for v in initial], train=train, num_samples=_pick(args, "num_samples"),
        seeds=_pick(args, "seeds"), seed=args.seed, objective=objective, evaluation=evaluation,
        evaluate_top=_pick(args, "evaluate_top"), asha=args.asha, grace_period=args.grace_period,
        max_concurrent=_pick(args, "max_concurrent"), cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, eval_cpus=args.eval_cpus, eval_gpus=args.eval_gpus,
        max_failures=args.max_failures, storage_path=str(Path(args.storage_path).resolve()),
        tracking_uri=resolve_tracking_uri(args.tracking_uri), experiment=args.experiment, smoke=args.smoke,
        code_version=git_version(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def find_resumable(storage_path: str | os.PathLike, kind: str, name: str | None) -> SweepSpec:
    """The saved spec of the sweep to continue: --name, else the newest `kind` sweep under storage_path."""
    root = Path(storage_path).resolve()
    if name is not None:
        if not (root / name / SPEC_NAME).is_file():
            raise SweepError(f"no sweep {name!r} to resume in {root} (expected {root / name / SPEC_NAME})")
        spec = SweepSpec.load(root / name)
        if spec.kind != kind:
            raise SweepError(f"sweep {name!r} in {root} is a {spec.kind} sweep; resume it with sweeps/{spec.kind}.py")
    else:
        candidates = []
        for path in root.glob(f"*/{SPEC_NAME}") if root.is_dir() else []:
            try:
                found = SweepSpec.load(path.parent)
            except (OSError, ValueError, TypeError):
                continue
            if found.kind == kind:
                candidates.append((path.stat().st_mtime, found))
        if not candidates:
            raise SweepError(f"no {kind} sweep to resume in {root}; start one without --resume")
        spec = max(candidates, key=lambda c: c[0])[1]
    spec.storage_path = str(root)  # the folder may have moved
    return spec


def main(parser: argparse.ArgumentParser, argv: Sequence[str] | None, kind: str,
         make_spec: Callable[[argparse.Namespace], SweepSpec]) -> int:
    """Parse, validate, build (or, with --resume, load) the spec, run the sweep; one-line errors, exit 2."""
    args = parser.parse_args(argv)
    validate_common(args, parser)
    try:
        if args.resume:
            spec = find_resumable(args.storage_path, kind, args.name)
        else:
            spec = make_spec(args)
        return run_sweep(spec, args.address, args.data_dir, resume=args.resume)
    except (SweepError, ConfigError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; continue with --resume", file=sys.stderr)
        return 130


def paper_values(kind: str, dataset: str, initial: str) -> list[float]:
    """Values evaluated before Optuna's proposals: 'paper' (the value the paper selected), 'paper-grid', 'none'."""
    if initial == "none":
        return []
    if kind == "sigma_aug":
        return [PAPER_SIGMA_AUG[dataset]] if initial == "paper" else list(PAPER_SIGMA_GRID)
    return [PAPER_ETA[dataset]] if initial == "paper" else list(PAPER_SE_ETA_GRID)
