"""The typed search space (raven.sweep.space): its Tune domain, middle point, initial points, saved form, old specs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search.sample import Categorical, Float

from raven.config import PAPER_ETA, PAPER_SIGMA_AUG, ConfigError
from raven.sweep.report import Sweep
from raven.sweep.space import PaperValues, SearchSpace
from raven.sweep.spec import SPEC_NAME, SweepSpec, add_arguments, find_resumable, spec_from_args

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def entry_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SWEEPS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_range_owns_its_log_uniform_domain_middle_and_initial_points():
    space = SearchSpace.log_uniform("tc_beta", 1, 16, initial=[1, 0.5, 4, 100])
    domain = space.domain()
    assert isinstance(domain, Float) and (domain.lower, domain.upper) == (1.0, 16.0)
    assert isinstance(domain.get_sampler(), Float._LogUniform)
    assert space.middle == pytest.approx(4.0)  # the geometric mean: what the sweep clock calibrates with
    assert space.initial == (1.0, 4.0)  # the values outside [1, 16] are left out, the order kept
    assert space.points_to_evaluate() == [{"tc_beta": 1.0}, {"tc_beta": 4.0}]
    assert 16.0 in space and 16.1 not in space and str(space) == "log-uniform in [1, 16]"
    assert space.is_log_uniform  # its runs log log10_tc_beta beside tc_beta


def test_a_grid_owns_its_categorical_domain_and_middle():
    space = SearchSpace.grid("eta", [50, 100, 250], initial=[500, 100], paper=500)
    domain = space.domain()
    assert isinstance(domain, Categorical) and domain.categories == [50.0, 100.0, 250.0]
    assert space.middle == 100.0 and space.initial == (100.0,) and space.paper == 500.0
    assert SearchSpace.grid("eta", [1, 2]).points_to_evaluate() is None
    assert not space.is_log_uniform


@pytest.mark.parametrize("build, message", [
    (lambda: SearchSpace.log_uniform("tc_beta", 20, 1), r"the tc_beta range must satisfy 0 < low < high"),
    (lambda: SearchSpace.log_uniform("sigma_aug", 0, 1), r"the sigma_aug range must satisfy"),
    (lambda: SearchSpace.log_uniform("eta", 1, math.inf), r"the eta range must satisfy"),
    (lambda: SearchSpace.grid("eta", [1, 1]), r"the eta grid must hold distinct finite numbers > 0"),
    (lambda: SearchSpace("eta", low=1, high=2, values=(1.0,)), r"a range or a grid, not both"),
])
def test_a_bad_space_is_rejected_in_one_line_naming_the_parameter(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_paper_values_pick_the_initial_points_of_each_data_set():
    paper = PaperValues(selected=PAPER_SIGMA_AUG, grid=(0.01, 0.1, 1.0))
    assert paper.pick("paper", "mnist") == (0.01,) and paper.pick("paper", "fashion-mnist") == (0.04,)
    assert paper.pick("paper-grid", "mnist") == (0.01, 0.1, 1.0) and paper.pick("none", "mnist") == ()


def test_each_entry_script_gets_its_own_paper_values_or_none():
    """The bug this module fixed: every parameter but sigma_aug used to get eta's paper values."""
    sigma, eta, tc_beta = entry_script("sigma_aug"), entry_script("se_eta"), entry_script("tc_beta")
    for script, param, paper in ((sigma, "sigma_aug", PAPER_SIGMA_AUG), (eta, "eta", PAPER_ETA)):
        for dataset in paper:
            space = script.search_space(script.build_parser().parse_args(["--dataset", dataset]))["space"]
            assert (space.param, space.initial, space.paper) == (param, (paper[dataset],), paper[dataset])
    chosen = tc_beta.search_space(tc_beta.build_parser().parse_args([]))
    assert chosen["method"] == "beta-tcvae"
    space = chosen["space"]
    assert (space.param, space.low, space.high, space.paper) == ("tc_beta", 1.0, 20.0, None)
    assert space.initial == (1.0, pytest.approx(math.sqrt(20)))  # the VAE, then the range's middle
    assert tc_beta.search_space(tc_beta.build_parser().parse_args(["--initial", "none"]))["space"].initial == ()
    narrow = tc_beta.search_space(tc_beta.build_parser().parse_args(["--tc-beta-min", "2", "--tc-beta-max", "8"]))
    assert narrow["space"].initial == (4.0,)  # tc_beta = 1 is outside [2, 8]


def test_a_tc_beta_spec_trains_beta_tcvae_with_the_searched_value(tmp_path):
    tc_beta = entry_script("tc_beta")
    args = tc_beta.build_parser().parse_args(["--smoke", "--storage-path", str(tmp_path)])
    spec = spec_from_args(args, kind="tc_beta", **tc_beta.search_space(args))
    config = spec.train_config(7.5)
    assert (config.method, config.tc_beta) == ("beta-tcvae", 7.5)
    assert spec.experiment == "raven-tc-beta" and spec.name.startswith("tc-beta-mnist-")
    params = spec.mlflow_params()
    assert params["search.param"] == "tc_beta" and params["search.space.type"] == "loguniform"
    assert (params["search.space.low"], params["search.space.high"]) == (1.0, 20.0)
    assert "search.space.paper" not in params


def test_the_space_is_saved_with_the_spec_and_read_back(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    space = SearchSpace.grid("eta", [50, 500, 5000], initial=[500], paper=500)
    spec = spec_from_args(parser.parse_args(["--storage-path", str(tmp_path), "--name", "s"]), kind="se_eta",
                          method="se", space=space)
    spec.save()
    saved = json.loads((tmp_path / "s" / SPEC_NAME).read_text())
    assert saved["space"] == {"param": "eta", "type": "choice", "values": [50.0, 500.0, 5000.0], "paper": 500.0,
                              "initial": [500.0]}
    again = find_resumable(tmp_path, "se_eta", "s")
    assert again == spec and again.space == space and (again.param, again.initial) == ("eta", (500.0,))


def test_a_spec_saved_before_the_typed_space_still_loads(tmp_path):
    """raven_sweep.json as raven wrote it before raven.sweep.space: param, the space dict and initial side by side."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    new = spec_from_args(parser.parse_args(["--storage-path", str(tmp_path), "--name", "old"]), kind="sigma_aug",
                         method="raven", space=SearchSpace.log_uniform("sigma_aug", 1e-3, 1.0, initial=[0.01]))
    old = {**new.to_dict(), "param": "sigma_aug", "space": {"type": "loguniform", "low": 1e-3, "high": 1.0},
           "initial": [0.01]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / SPEC_NAME).write_text(json.dumps(old, indent=2))
    loaded = find_resumable(tmp_path, "sigma_aug", None)
    assert loaded == new
    assert loaded.space == SearchSpace("sigma_aug", low=1e-3, high=1.0, initial=(0.01,))
    assert SweepSpec.from_dict({**old, "param": "eta", "space": {"type": "choice", "values": [50, 500]},
                                "initial": [500], "method": "se"}).space == \
        SearchSpace.grid("eta", [50, 500], initial=[500])


def test_a_sweep_read_back_draws_the_paper_value_its_space_recorded():
    recorded = Sweep("sigma_aug", pd.Series({"params.dataset": "mnist", "params.search.space.paper": "0.01"}),
                     pd.DataFrame())
    assert recorded.paper_value == 0.01
    none = Sweep("tc_beta", pd.Series({"params.dataset": "mnist"}), pd.DataFrame())
    assert math.isnan(none.paper_value)
