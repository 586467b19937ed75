"""A sweep's Optuna study: its database and the searcher that writes into it.

The study (named after the sweep) lives in an RDB storage, `spec.study_storage`: SQLite beside
the sweep's Tune folder by default, PostgreSQL on a cluster, so `optuna-dashboard <storage>`
opens any sweep. Optuna's TPE (seeded) proposes configurations through Ray Tune's
`OptunaSearch`, for one objective or several (multi-objective TPE). Each Optuna trial carries
its Tune trial id (user attribute `tune_trial_id`); the study names its objectives and its MLflow
record. `--resume` continues the same study: Tune restores the searcher, which writes into the
same database; trials the database is ahead on are reconciled (`ObjectiveOptunaSearch`,
`fail_lost_trials`). With `--seeds N` a trial trains its configuration's N seeds as one pack
and reports their mean (raven.sweep.trial, raven.sweep.selection.seed_statistics): one Optuna trial per
configuration, whose value is that mean.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from ray.tune.search.optuna import OptunaSearch

from raven.sweep.spec import SweepError, SweepSpec


class ObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch over a persistent study: names each Optuna trial's Tune trial, skips epochs without the
    objective, and leaves alone the trials the study's database already holds as ended.

    The objective is computed every K epochs only; Optuna records intermediate values when there
    is one, and the trial's value is its last result's, on completion. The database can be ahead
    of the searcher Tune restores on --resume: a driver killed after telling Optuna that a trial
    ended, but before Tune saved its state, leaves that trial COMPLETE in the study while the
    restored trial reports its last result again.
    """

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result and not self._ended_in_study(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._ended_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def _ended_in_study(self, trial_id: str) -> bool:
        trial = self._ot_trials.get(trial_id)
        if trial is None:
            return False
        ended = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                  optuna.trial.TrialState.FAIL,
                                                                  optuna.trial.TrialState.PRUNED))
        return trial.number in {t.number for t in ended}


def open_study(spec: SweepSpec, resume: bool) -> optuna.Study:
    """The sweep's Optuna study (name = sweep name) in spec.study_storage, created unless `resume` finds it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objectives = spec.objective_list
    if spec.study_storage.startswith("sqlite:///"):
        Path(spec.study_storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(spec.study_storage)
        exists = spec.name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
        if exists and not resume:
            raise SweepError(f"the Optuna storage {spec.study_storage} already holds a study {spec.name!r}; "
                             "choose another --name, or continue it with --resume")
        study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                    directions=["maximize" if o.mode == "max" else "minimize" for o in objectives])
    except (SweepError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable database: one line
        raise SweepError(f"cannot open the Optuna study storage {spec.study_storage}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    with warnings.catch_warnings():  # experimental since Optuna 3.2; the dashboard shows the names
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.metric for o in objectives])
    for key, value in {"raven.sweep_name": spec.name, "search.param": spec.param, "method": spec.method,
                       "dataset": spec.dataset, "mlflow.tracking_uri": spec.tracking_uri,
                       "mlflow.experiment": spec.experiment}.items():
        study.set_user_attr(key, value)
    return study


def fail_lost_trials(study: optuna.Study, known: set[str]) -> int:
    """Mark FAILED the study's RUNNING trials whose Tune trial the saved Tune state does not know.

    A driver that dies after the searcher asked for a trial but before Tune saved its state
    leaves that trial RUNNING in the storage forever; the resumed sweep runs a new one instead.
    """
    lost = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("tune_trial_id") not in known]
    for trial in lost:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(lost)
