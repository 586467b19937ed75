"""Choosing configurations (raven.selection, raven.study): Pareto front, ranking, repeats, the study across a resume."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
from ray import tune

from raven.selection import Objective, candidates, pareto_mask, rank_configurations
from raven.sweep_spec import SweepError, SweepSpec
from raven.study import MeanRepeater, ObjectiveOptunaSearch, fail_lost_trials, open_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_pareto_front_is_optunas_best_trials():
    """Against Optuna's own Pareto front (study.best_trials) on random values with ties, mixed directions."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        values = rng.integers(0, 6, size=(30, 3)).astype(float)  # small integers: many ties and duplicates
        modes = ["max", "min", "max"]
        study = optuna.create_study(directions=["maximize", "minimize", "maximize"])
        for row in values:
            study.add_trial(optuna.trial.create_trial(values=list(row), params={}, distributions={}))
        expected = {t.number for t in study.best_trials}
        assert set(np.flatnonzero(pareto_mask(values, modes))) == expected, trial


def _table(rows):
    return pd.DataFrame(rows, columns=["sigma_aug", "seed", "status", "val_robust_accuracy", "val_elbo"])


def test_ranking_puts_the_pareto_front_first_and_evaluates_only_it():
    table = _table([
        (0.01, 0, "TERMINATED", 0.40, -550.0), (0.01, 1, "TERMINATED", 0.42, -540.0),  # mean 0.41, -545
        (0.1, 0, "TERMINATED", 0.45, -600.0),                                          # most robust
        (0.2, 0, "TERMINATED", 0.30, -500.0),                                          # best ELBO
        (0.3, 0, "TERMINATED", 0.29, -610.0),                                          # dominated by all
        (0.5, 0, "ERROR", 0.99, -1.0),                                                 # errored: ignored
        (0.6, 0, "TERMINATED", np.nan, -400.0),                                        # no objective: ignored
    ])
    both = (Objective("val_robust_accuracy", "max"), Objective("val_elbo", "max"))
    ranked = rank_configurations(table, "sigma_aug", both)
    assert list(ranked.index) == [0.1, 0.01, 0.2, 0.3]
    assert list(ranked["pareto"]) == [True, True, True, False]
    assert ranked.loc[0.01, "val_robust_accuracy_mean"] == pytest.approx(0.41)
    assert ranked.loc[0.01, "count"] == 2
    assert candidates(ranked, 2, both) == [0.1, 0.01]
    assert candidates(ranked, 10, both) == [0.1, 0.01, 0.2]  # never beyond the front
    one = (Objective("val_robust_accuracy", "max"),)
    single = rank_configurations(table, "sigma_aug", one)
    assert candidates(single, 3, one) == [0.1, 0.01, 0.2]  # one objective: the top K, front or not
    elbo_min = rank_configurations(table, "sigma_aug", (Objective("val_elbo", "min"),))
    assert elbo_min.index[0] == 0.3


class _Recorder(tune.search.Searcher):
    def __init__(self, metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.told = []

    def suggest(self, trial_id):
        return {"x": 1.0}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result))


def test_repeats_report_the_mean_of_every_objective():
    inner = _Recorder(["a", "b"], ["max", "min"])
    repeater = MeanRepeater(inner, repeat=3)
    for trial in ("t1", "t2", "t3"):
        repeater.suggest(trial)
    for trial, (a, b) in zip(("t1", "t2", "t3"), ((1.0, 10.0), (2.0, 20.0), (6.0, 60.0))):
        repeater.on_trial_complete(trial, {"a": a, "b": b})
    assert inner.told == [("t1", {"a": 3.0, "b": 30.0})]
    single = _Recorder("a", "max")
    repeater = MeanRepeater(single, repeat=2)
    repeater.suggest("u1"), repeater.suggest("u2")
    repeater.on_trial_complete("u1", {"a": 1.0})
    repeater.on_trial_complete("u2", {"a": 2.0, "b": 5.0})
    assert single.told == [("u1", {"a": 1.5})]


def test_study_lives_in_its_storage_and_a_resume_continues_it(tmp_path):
    spec = SweepSpec(kind="sigma_aug", method="raven", param="sigma_aug", name="s1", storage_path=str(tmp_path),
                     space={"type": "loguniform", "low": 1e-3, "high": 1.0},
                     objectives=("val_robust_accuracy:max", "val_elbo:max"),
                     study_storage=f"sqlite:///{tmp_path / 's1' / 'optuna.db'}")
    study = open_study(spec, resume=False)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    assert study.metric_names == ["val_robust_accuracy", "val_elbo"]
    with pytest.raises(SweepError, match="already holds a study 's1'"):
        open_study(spec, resume=False)
    # The searcher writes into that study; pickled (Tune's experiment state) and restored, it goes on there.
    searcher = ObjectiveOptunaSearch(metric=["val_robust_accuracy", "val_elbo"], mode=["max", "max"],
                                     study_name="s1", storage=optuna.storages.RDBStorage(spec.study_storage),
                                     sampler=optuna.samplers.TPESampler(seed=0))
    searcher.set_search_properties(None, None, {"sigma_aug": tune.loguniform(1e-3, 1.0)})
    searcher.suggest("t1"), searcher.suggest("t2")
    searcher.save(str(tmp_path / "searcher.pkl"))
    # After the save, t1 ends in the database and t3 is asked: the driver then dies.
    searcher.on_trial_complete("t1", {"val_robust_accuracy": 0.4, "val_elbo": -500.0})
    searcher.suggest("t3")
    restored = ObjectiveOptunaSearch(metric=["val_robust_accuracy", "val_elbo"], mode=["max", "max"])
    restored.restore(str(tmp_path / "searcher.pkl"))
    # The restored t1 reports its last result again: the study keeps the first telling, nothing fails.
    restored.on_trial_result("t1", {"val_robust_accuracy": 0.4, "val_elbo": -500.0, "training_iteration": 1})
    restored.on_trial_complete("t1", {"val_robust_accuracy": 0.9, "val_elbo": -1.0})
    restored.on_trial_complete("t2", {"val_robust_accuracy": 0.5, "val_elbo": -520.0})
    resumed = open_study(spec, resume=True)
    assert fail_lost_trials(resumed, known={"t1", "t2"}) == 1
    trials = optuna.load_study(study_name="s1", storage=spec.study_storage).trials
    assert [(t.user_attrs["tune_trial_id"], t.state.name) for t in trials] == \
        [("t1", "COMPLETE"), ("t2", "COMPLETE"), ("t3", "FAIL")]
    assert trials[0].values == [0.4, -500.0] and trials[1].values == [0.5, -520.0]


def test_a_restored_trial_that_already_ended_in_the_study_is_left_alone(tmp_path):
    """One objective: the re-reported last epoch of a trial the database holds as COMPLETE raises nothing."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=storage, study_name="s2", direction="maximize")
    searcher = ObjectiveOptunaSearch(metric="val_robust_accuracy", mode="max", study_name="s2",
                                     storage=optuna.storages.RDBStorage(storage))
    searcher.set_search_properties(None, None, {"sigma_aug": tune.loguniform(1e-3, 1.0)})
    searcher.suggest("t1")
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.on_trial_result("t1", {"val_robust_accuracy": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("t1", {"val_robust_accuracy": 0.3})
    restored = ObjectiveOptunaSearch(metric="val_robust_accuracy", mode="max")
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("t1", {"val_robust_accuracy": 0.3, "training_iteration": 1})
    restored.on_trial_complete("t1", {"val_robust_accuracy": 0.3})
    (trial,) = optuna.load_study(study_name="s2", storage=storage).trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.3 and trial.intermediate_values == {1: 0.3}
