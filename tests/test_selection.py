"""Choosing configurations (raven.sweep.selection, raven.sweep.study): Pareto front, ranking, seeds, the study across a resume."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
from ray import tune

from raven.sweep.report import trial_table
from raven.sweep.selection import Objective, candidates, pareto_mask, rank_configurations, seed_statistics
from raven.sweep.space import SearchSpace
from raven.sweep.spec import SweepError, SweepSpec
from raven.sweep.study import ObjectiveOptunaSearch, fail_lost_trials, open_study

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


def test_a_trial_reports_the_mean_std_and_each_seed_of_every_model_metric():
    members = {3: {"val_robust_accuracy": 0.40, "val_elbo": -500.0, "train_loss": 510.0, "epoch_seconds": 9.0},
               4: {"val_robust_accuracy": 0.46, "val_elbo": -520.0, "train_loss": 530.0, "epoch_seconds": 9.0},
               5: {"val_robust_accuracy": 0.49, "val_elbo": -490.0, "train_loss": 505.0, "epoch_seconds": 9.0}}
    result = seed_statistics(members)
    for name in ("val_robust_accuracy", "val_elbo", "train_loss"):
        values = [m[name] for m in members.values()]
        assert result[name] == pytest.approx(statistics.mean(values))
        assert result[f"{name}_std"] == pytest.approx(statistics.stdev(values))  # the sample std, as the ranking's
        assert [result[f"{name}_seed{s}"] for s in (3, 4, 5)] == values
    assert "epoch_seconds" not in result  # the trial's own numbers are not averaged here
    # A seed that diverged reports nothing more: the others' mean; one seed alone has no std.
    del members[5]["val_elbo"], members[4]["val_elbo"]
    result = seed_statistics(members)
    assert result["val_elbo"] == -500.0 and "val_elbo_std" not in result and "val_elbo_seed4" not in result
    # One seed: its values under their own names, nothing else.
    assert seed_statistics({0: {"val_elbo": -500.0, "val_loss": 3.0}}) == {"val_elbo": -500.0, "val_loss": 3.0}


class _Grid:
    """What trial_table reads of Tune's ResultGrid: the trials' last results, and the results in creation order."""

    def __init__(self, rows, results):
        self.rows, self.results = rows, results

    def get_dataframe(self):
        return pd.DataFrame(self.rows)

    def __iter__(self):
        return iter(self.results)


def test_the_trial_table_has_a_row_per_seed_and_ranks_their_mean(tmp_path):
    """Tune's last results of packed trials of seeds 0-2 become one row per seed; the ranking's mean and std
    over those rows are the trial's own reported ones."""
    spec = SweepSpec(kind="sigma_aug", method="raven", seeds=3, storage_path=str(tmp_path),
                     space=SearchSpace.log_uniform("sigma_aug", 1e-3, 1.0))
    accuracy = {"a": [0.40, 0.46, 0.49], "b": [0.30, 0.35, np.nan]}  # seed 2 of trial b diverged
    rows = []
    for trial_id, values in accuracy.items():
        members = {s: {"val_robust_accuracy": v, "val_elbo": -500.0 - s} for s, v in enumerate(values) if v == v}
        rows.append({"trial_id": trial_id, "config/sigma_aug": 0.1 if trial_id == "a" else 0.2, "epoch": 2,
                     **seed_statistics(members)})
    grid = _Grid(rows, [SimpleNamespace(path=str(tmp_path / f"trial_{t}"), error=None, checkpoint=None)
                        for t in accuracy])
    table = trial_table(grid, spec, {"a": "run-a"})
    assert list(zip(table["trial_id"], table["seed"], table["status"])) == [
        ("a", 0, "TERMINATED"), ("a", 1, "TERMINATED"), ("a", 2, "TERMINATED"),
        ("b", 0, "TERMINATED"), ("b", 1, "TERMINATED"), ("b", 2, "DIVERGED")]
    assert list(table["val_robust_accuracy"][:5]) == [0.40, 0.46, 0.49, 0.30, 0.35]
    assert list(table["mlflow_run_id"]) == ["run-a"] * 3 + [""] * 3
    ranked = rank_configurations(table, "sigma_aug", (Objective("val_robust_accuracy", "max"),))
    for trial_id, value in (("a", 0.1), ("b", 0.2)):
        reported = next(r for r in rows if r["trial_id"] == trial_id)
        assert ranked.loc[value, "val_robust_accuracy_mean"] == pytest.approx(reported["val_robust_accuracy"])
        assert ranked.loc[value, "val_robust_accuracy_std"] == pytest.approx(reported["val_robust_accuracy_std"])
    assert list(ranked["count"]) == [3, 2]


def test_study_lives_in_its_storage_and_a_resume_continues_it(tmp_path):
    spec = SweepSpec(kind="sigma_aug", method="raven", name="s1", storage_path=str(tmp_path),
                     space=SearchSpace.log_uniform("sigma_aug", 1e-3, 1.0),
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
