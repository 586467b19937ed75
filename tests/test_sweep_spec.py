"""The sweep spec (raven.sweep.spec): flags made from its fields, the presets, validation, the saved file."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from raven.config import ConfigError
from raven.sweep.space import SearchSpace
from raven.sweep.spec import SweepSpec, add_arguments, find_resumable, hide_password, spec_from_args

SEARCH = {"kind": "sigma_aug", "method": "raven",
          "space": SearchSpace.log_uniform("sigma_aug", 1e-3, 1.0, initial=[0.01])}


def parse(*flags: str, **defaults) -> SweepSpec:
    parser = argparse.ArgumentParser()
    add_arguments(parser, **defaults)
    return spec_from_args(parser.parse_args(list(flags)), **SEARCH)


def test_every_flag_field_is_a_flag_and_only_those():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions} - {"help", "address", "resume", "data_dir", "_spec_defaults"}
    fields = {f.name for f in dataclasses.fields(SweepSpec) if "help" in f.metadata}
    assert flags == fields
    assert {"kind", "method", "param", "space", "code_version"}.isdisjoint(flags)


def test_presets_and_explicit_flags(tmp_path):
    full = parse("--storage-path", str(tmp_path), experiment="raven-sigma-aug")
    assert (full.num_samples, full.epochs, full.limit, full.fid, full.eval_steps) == (20, 20, None, True, 50)
    assert full.experiment == "raven-sigma-aug" and full.name.startswith("sigma-aug-mnist-")
    assert full.study_storage == f"sqlite:///{tmp_path / full.name / 'optuna.db'}"
    assert full.tracking_uri.startswith("sqlite:////")  # pinned to an absolute path
    smoke = parse("--smoke", "--epochs", "3", "--no-tsne", "--objectives", "val_robust_accuracy:max,val_elbo:max",
                  "--storage-path", str(tmp_path))
    assert (smoke.num_samples, smoke.limit, smoke.fid, smoke.eval_deltas) == (2, 1000, False, (0.0, 0.1, 0.2))
    assert smoke.epochs == 3 and smoke.tsne is False  # explicit flags win over the preset
    assert [str(o) for o in smoke.objective_list] == ["val_robust_accuracy:max", "val_elbo:max"]
    assert smoke.train_config(0.05, repeat=2).to_dict()["seed"] == 2
    # Saved and read back unchanged (the file --resume reads).
    smoke.save()
    again = find_resumable(tmp_path, "sigma_aug", None)
    assert again == smoke


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial must be >= 0"),
    (["--name", "a b"], "--name may hold"),
    (["--objectives", "val_robust_accuracy:up"], "METRIC:max or METRIC:min"),
    (["--objectives", "test_accuracy:max"], "unknown metric 'test_accuracy'"),
    (["--objectives", "val_robust_accuracy:max,val_elbo:max", "--asha"], "--asha stops trials on one metric"),
    (["--eval-deltas", "0,2"], "every delta must be a number in [0, 1]"),
    (["--objective", "strong", "--objectives", "val_robust_accuracy:max"], "unknown metric 'val_robust_accuracy'"),
])
def test_bad_values_are_rejected_in_one_line_naming_the_flag(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(*flags, "--storage-path", str(tmp_path))


def test_the_strong_objective_sets_its_metric_steps_and_protocol(tmp_path):
    paper = parse("--storage-path", str(tmp_path))
    strong = parse("--objective", "strong", "--storage-path", str(tmp_path))
    assert paper.objectives == ("val_robust_accuracy:max",) and paper.objective_settings.steps == 10
    assert strong.objectives == ("val_strong_robust_accuracy:max",)
    settings = strong.objective_settings
    assert (settings.protocol, settings.steps, settings.val_limit) == ("strong", 20, 1000)
    assert settings.metrics() == ("val_strong_robust_accuracy", "val_clean_accuracy", "val_strong_acc_delta_0.025",
                                  "val_strong_acc_delta_0.05", "val_strong_acc_delta_0.1")
    both = parse("--objective", "strong", "--objective-steps", "7", "--objectives",
                 "val_strong_robust_accuracy:max,val_elbo:max", "--storage-path", str(tmp_path))
    assert both.objective_settings.strong_settings().steps == 7 and len(both.objective_list) == 2
    # The final evaluation adds the strong protocol when the search selected on it; a flag overrides.
    assert (paper.eval_config.protocol, strong.eval_config.protocol) == ("paper", "both")
    assert parse("--eval-protocol", "strong", "--storage-path", str(tmp_path)).eval_config.protocol == "strong"


def test_the_certified_objective_sets_its_metric_and_protocol(tmp_path):
    certified = parse("--objective", "certified", "--objective-images", "300", "--storage-path", str(tmp_path))
    assert certified.objectives == ("val_certified_accuracy:max",)
    settings = certified.objective_settings
    assert (settings.protocol, settings.val_limit, settings.certified_settings().deltas) == ("certified", 300,
                                                                                             (0.01, 0.025))
    assert settings.metrics() == ("val_certified_accuracy", "val_clean_accuracy", "val_certified_acc_delta_0.01",
                                  "val_certified_acc_delta_0.025")
    assert certified.eval_config.protocol == "all"  # the final evaluation adds the certified bound
    both = parse("--objective", "certified", "--objectives", "val_certified_acc_delta_0.01:max,val_elbo:max",
                 "--storage-path", str(tmp_path))
    assert [str(o) for o in both.objective_list] == ["val_certified_acc_delta_0.01:max", "val_elbo:max"]
    with pytest.raises(ConfigError, match="unknown metric 'val_strong_robust_accuracy'"):
        parse("--objective", "certified", "--objectives", "val_strong_robust_accuracy:max",
              "--storage-path", str(tmp_path))


def test_passwords_stay_out_of_what_is_shown():
    assert hide_password("postgresql+psycopg2://mlflow:s3cret@db:5432/optuna") == \
        "postgresql+psycopg2://mlflow:***@db:5432/optuna"
    assert hide_password("sqlite:////tmp/x/optuna.db") == "sqlite:////tmp/x/optuna.db"


def test_eta_values_make_a_grid_searched_in_the_order_given():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("se_eta", Path(__file__).resolve().parents[1] / "sweeps" / "se_eta.py")
    se_eta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(se_eta)
    args = se_eta.build_parser().parse_args(["--eta-values", "3,0.1,10"])
    space = se_eta.search_space(args)
    assert space["space"].describe() == {"type": "choice", "values": [3.0, 0.1, 10.0], "paper": 500.0}
    assert space["space"].initial == (3.0, 0.1, 10.0)
    default = se_eta.search_space(se_eta.build_parser().parse_args([]))
    # The default range reaches below the paper's grid, where the tuned optimum (10) lies.
    assert default["space"].describe() == {"type": "loguniform", "low": 0.1, "high": 1e4, "paper": 500.0}
    with pytest.raises(SystemExit):
        se_eta.build_parser().parse_args(["--eta-values", "1,1"])
