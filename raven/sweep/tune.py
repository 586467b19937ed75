"""The Ray Tune side of a sweep on the driver: the Tuner and its callbacks (the trainable is raven.sweep.trial).

* The Tuner: the trainable (raven.sweep.trial.sweep_trial) with its resources, the searcher over
  the sweep's Optuna study (raven.sweep.study) and the search space's domain and initial points
  (raven.sweep.space), ASHA when asked, the callbacks; or the interrupted Tuner, restored.
* Two callbacks on the driver: `MlflowCallback` turns Tune's events into writes queued on the
  sweep's tracker, the driver's own (raven.record.tracking, raven.record.write_queue: one queue for the whole
  sweep, which the driver drains once at its end); `ProgressCallback` prints one line per trial
  epoch with the time left (raven.sweep.clock) and a bar on a terminal.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raven.progress import bar, say
from raven.record.sweep_tracker import SweepTracker
from raven.record.tracking import CHECKPOINT, ERROR_FILE, TRIAL_RESTARTS, TRIAL_STATUS
from raven.sweep.clock import Rates, SweepClock
from raven.sweep.spec import SweepSpec
from raven.sweep.study import ObjectiveOptunaSearch
from raven.sweep.trial import REPORTED_NAME, sweep_trial, trial_label, trial_params

# Metrics of the trainable's own reports that go into MLflow (Tune adds its bookkeeping keys).
_EPOCH_METRIC_PREFIXES = ("train_", "val_")
_EPOCH_METRIC_NAMES = ("epoch_seconds", "images_per_second")
_SHOWN = ("train_loss", "val_elbo")


# ----------------------------------------------------------------------------- naming


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_name(trial) -> str:
    """Tune's name of a trial: the searched value and the id (sigma_aug=0.01_<id>)."""
    value = next((f"{k}={float(v):.3g}" for k, v in trial.config.items()), "trial")
    return f"{value}_{trial.trial_id}"


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainable's own numeric metrics from a Tune result (Tune's bookkeeping keys dropped)."""
    return {k: float(v) for k, v in result.items()
            if (k.startswith(_EPOCH_METRIC_PREFIXES) or k in _EPOCH_METRIC_NAMES)
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def build_tuner(spec: SweepSpec, tracker: SweepTracker, splits_ref, trial_gpus: float, inputs: list[dict[str, Any]],
                rates: Rates, slots: int, eval_slots: int, resume: bool) -> tune.Tuner:
    """A new Tuner whose MLflow callback writes through `tracker`, or the interrupted one restored from
    spec.experiment_dir when `resume` (its unpickled callback finds the same tracker: raven.record.sweep_tracker.sweep_tracker)."""
    # Results without the objective (epochs before the last) are expected.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Save the experiment state (what --resume restores) every 5 s instead of Tune's adaptive
    # >= 10 s, so that a driver that dies (SIGKILL, lost head) loses less; an explicit value wins.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    # Frequent snapshots are the point (above); Tune's three-line warning about them is not news.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The classic output engine, which verbose=0 silences (the newer one still prints its banners):
    # the driver prints its own progress (ProgressCallback).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # A trial of N seeds is one process doing N models' arithmetic in --cpus-per-trial threads (on a
    # GPU, in one pack: the speed-up of raven.pack). Its CPUs are not scaled with N: one CPU per trial
    # keeps as many configurations in flight as there are cores, at the same models per second as N
    # one-seed trials (README, "Seeds of a configuration"); --cpus-per-trial N gives a pack N threads.
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, splits=splits_ref, spec=spec.to_dict()),
                                    {"cpu": spec.cpus_per_trial, "gpu": trial_gpus})
    experiment_dir = str(spec.experiment_dir.resolve())
    if resume and tune.Tuner.can_restore(experiment_dir):
        return tune.Tuner.restore(experiment_dir, trainable=trainable, resume_errored=True, restart_errored=False)

    objectives = spec.objective_list
    metric: str | list[str] = objectives[0].metric if len(objectives) == 1 else [o.metric for o in objectives]
    mode: str | list[str] = objectives[0].mode if len(objectives) == 1 else [o.mode for o in objectives]
    searcher = ObjectiveOptunaSearch(metric=metric, mode=mode, study_name=spec.name,
                                     storage=optuna.storages.RDBStorage(spec.study_storage),
                                     points_to_evaluate=spec.space.points_to_evaluate(),
                                     sampler=optuna.samplers.TPESampler(seed=spec.seed))
    scheduler = None
    if spec.asha:
        scheduler = ASHAScheduler(time_attr="epoch", metric=objectives[0].metric, mode=objectives[0].mode,
                                  max_t=spec.epochs, grace_period=min(spec.grace_period, spec.epochs),
                                  reduction_factor=2)
    return tune.Tuner(
        trainable,
        param_space={spec.param: spec.space.domain()},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(Path(spec.storage_path).resolve()),
            callbacks=[MlflowCallback(tracker, spec.to_dict(), inputs),
                       ProgressCallback(spec.to_dict(), rates, slots, eval_slots)],
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )


# ----------------------------------------------------------------------------- callbacks


class MlflowCallback(tune.Callback):
    """Tune's events as queued MLflow writes: a child run per trial, per-epoch metrics, status, node, checkpoint.

    A trial of several seeds is one run: its metrics are the means over the seeds under their own
    names, with `<metric>_std` and `<metric>_seed<S>` beside them (raven.sweep.selection.seed_statistics).

    Tune pickles it with the experiment (tuner.pkl) and restores it on `--resume`; it holds no
    state of its own beyond the tracker settings: runs and logged epochs are found in MLflow.
    A write the store cannot take now waits in the tracker's queue; one it rejects is reported
    and dropped; neither stops the sweep, and the driver, not the callback, waits for the queue.
    """

    def __init__(self, tracker: SweepTracker, spec: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self.tracker = tracker
        self.spec = spec
        self.inputs = inputs  # the dataset inputs of every trial run (raven.record.tracking.dataset_inputs)
        self._sweep = SweepSpec.from_dict(spec)
        self._warned: set[str] = set()
        self._nodes: dict[str, str] = {}  # trial id -> node id of its last recorded epoch

    def __getstate__(self) -> dict[str, Any]:
        return {"tracker": self.tracker, "spec": self.spec, "inputs": self.inputs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracker"], state["spec"], state["inputs"])

    def _submit(self, what: str, op: dict[str, Any]) -> None:
        try:
            self.tracker.queue.submit(op)
        except Exception as exc:  # noqa: BLE001 - the sweep goes on; the record shows the gap
            if what not in self._warned:
                self._warned.add(what)
                print(f"raven sweep: warning: MLflow {what} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    def _epoch(self, trial, metrics: dict[str, Any]) -> None:
        if metrics.get("epoch") is not None:
            self._submit("epoch logging", {"op": "epoch", "trial_id": trial.trial_id, "epoch": int(metrics["epoch"]),
                                           "metrics": epoch_metrics(metrics)})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._submit("trial start", {"op": "trial", "trial_id": trial.trial_id, "reopen": True,
                                     "params": trial_params(self._sweep, trial.config),
                                     "run_name": trial_label(self._sweep, trial.config, trial.trial_id),
                                     "inputs": self.inputs})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._epoch(trial, result)
        node = result.get("node_id")
        if isinstance(node, str) and node and self._nodes.get(trial.trial_id) != node:
            self._nodes[trial.trial_id] = node
            self._submit("node tag", {"op": "node", "trial_id": trial.trial_id, "node_id": node,
                                      "node_ip": str(result.get("node_ip") or "")})

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._submit("checkpoint tag", {"op": "tags", "trial_id": trial.trial_id, "tags": {CHECKPOINT: checkpoint.path}})

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._submit("trial restart tag", {"op": "tags", "trial_id": trial.trial_id,
                                           "tags": {TRIAL_RESTARTS: trial.num_failures}})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # Epochs reported while the driver was down are in the checkpoint's reported.json.
        if trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                path = Path(folder) / REPORTED_NAME
                history = json.loads(path.read_text()) if path.is_file() else []
            for metrics in history:
                self._epoch(trial, metrics)
            nodes = [m["node_id"] for m in history if isinstance(m.get("node_id"), str) and m["node_id"]]
            if nodes:
                self._submit("node tag", {"op": "node", "trial_id": trial.trial_id, "node_id": nodes[-1],
                                          "history": nodes})
        self._submit("trial completion", {"op": "tags", "trial_id": trial.trial_id,
                                          "tags": {TRIAL_STATUS: "TERMINATED"}})
        self._submit("trial completion", {"op": "finish", "trial_id": trial.trial_id, "status": "FINISHED"})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._submit("trial error", {"op": "tags", "trial_id": trial.trial_id,
                                     "tags": {TRIAL_STATUS: "ERROR", ERROR_FILE: trial.error_file or ""}})
        self._submit("trial error", {"op": "finish", "trial_id": trial.trial_id, "status": "FAILED"})

    def on_step_end(self, iteration, trials, **info) -> None:
        # Writes queued during an outage go out as soon as the store is back, not only at the next result.
        if self.tracker.queue.pending:
            self.tracker.queue.flush()


class ProgressCallback(tune.Callback):
    """One line per trial epoch with the time left (and a bar over all trial-epochs on a terminal)."""

    def __init__(self, spec: dict[str, Any], rates: Rates, slots: int, eval_slots: int) -> None:
        self.spec, self.rates, self.slots, self.eval_slots = spec, rates, slots, eval_slots
        self._sweep = SweepSpec.from_dict(spec)
        self.clock: SweepClock | None = None
        self._bar = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "rates": self.rates, "slots": self.slots, "eval_slots": self.eval_slots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], state["rates"], state["slots"], state["eval_slots"])

    def setup(self, **info) -> None:
        self.clock = SweepClock.for_spec(self._sweep, self.rates, self.slots, self.eval_slots)
        for trial_id, epochs in epochs_in_storage(self._sweep).items():
            self.clock.epochs_done[trial_id] = epochs
        self._bar = bar(self.clock.trial_epochs_total, "search", "epoch", initial=self.clock.trial_epochs_done)

    def _say(self, line: str) -> None:
        say(f"raven sweep: {line}", self._bar)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("epoch") is None or self.clock is None:
            return
        epoch = int(result["epoch"])
        before = self.clock.trial_epochs_done
        objective_s = result.get("objective_seconds")
        self.clock.epoch(trial.trial_id, epoch, result.get("time_this_iter_s"),
                         objective_s if isinstance(objective_s, (int, float)) else None)
        self._bar.update(self.clock.trial_epochs_done - before)
        shown = [f"{key} {_with_std(result, key, '.4g')}"
                 for key in (*_SHOWN, *(o.metric for o in self._sweep.objective_list))
                 if isinstance(result.get(key), (int, float))]
        node = result.get("node_id")
        where = f" on node {node[:8]}" if isinstance(node, str) and node else ""
        self._bar.set_postfix_str(self.clock.text())
        self._say(f"trial {trial.trial_id} epoch {epoch}/{self._sweep.epochs}{where}: {', '.join(dict.fromkeys(shown))}"
                  f"; {self.clock.text()}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # Tune registers a checkpoint only after a round trip to the trial; one the trial stored just
        # before it died is found in storage by the trainable itself (_newest_saved_checkpoint).
        restored = (trial.checkpoint.path if trial.checkpoint is not None
                    else "its newest complete checkpoint in storage, if any (none registered yet)")
        self._say(f"trial {trial.trial_id} failed (failure {trial.num_failures}; see {trial.error_file}); "
                  f"it restarts from {restored}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if self.clock is not None:
            before = self.clock.trial_epochs_done
            self.clock.trial_finished(trial.trial_id)
            self._bar.update(self.clock.trial_epochs_done - before)
        last = trial.last_result or {}
        values = [f"{o.metric}={_with_std(last, o.metric, '.4f')}" for o in self._sweep.objective_list
                  if isinstance(last.get(o.metric), (int, float))]
        self._say(f"trial {trial.trial_id} finished: {', '.join(values) or 'no objective'}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(f"trial {trial.trial_id} failed (see {trial.error_file})")

    def on_experiment_end(self, trials, **info) -> None:
        if self._bar is not None:
            self._bar.close()


def _with_std(result: dict[str, Any], key: str, spec: str) -> str:
    """A reported mean, with its std over the trial's seeds when it has several: 0.4512 +- 0.0123."""
    std = result.get(f"{key}_std")
    return f"{result[key]:{spec}}" + (f" +- {std:{spec}}" if isinstance(std, (int, float)) else "")


def epochs_in_storage(spec: SweepSpec) -> dict[str, int]:
    """{trial id: epochs reported} from the progress.csv files of the sweep's Tune folder (a resumed sweep)."""
    out = {}
    for progress in spec.experiment_dir.glob("trial_*/progress.csv"):
        rows = progress.read_text().strip().splitlines()
        out[progress.parent.name.removeprefix("trial_")] = max(0, len(rows) - 1)
    return out
