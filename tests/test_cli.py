"""`raven train` end to end for every method, its one-line errors, and the MLflow record of `raven evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import raven
from raven.cli import main
from raven.config import METHODS


@pytest.mark.parametrize("method", METHODS)
def test_train_command_writes_checkpoint_and_metrics(method, tmp_path, data_dir, capsys):
    out = tmp_path / method
    code = main(["train", "--method", method, "--dataset", "mnist", "--limit", "2000", "--epochs", "1",
                 "--out", str(out), "--data-dir", str(data_dir), "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == method and metrics["train_images"] == 2000
    assert len(metrics["history"]) == 1
    for key in ("train_loss", "val_loss", "val_elbo", "val_mse_255", "images_per_second"):
        assert isinstance(metrics["final"][key], float)
    model = raven.load_checkpoint(out)
    assert model.config.method == method
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sigma-aug", "0"], "sigma_aug must be a finite number > 0"),
        (["--sigma-aug", "-0.5"], "sigma_aug must be a finite number > 0"),
        (["--eta", "-1"], "eta must be a finite number >= 0"),
        (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
        (["--method", "ae"], "invalid choice: 'ae'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_values_fail_before_work_with_one_line(args, message, tmp_path):
    base = ["train", "--method", "raven", "--out", str(tmp_path / "never"), "--data-dir", str(tmp_path / "no-data")]
    proc = subprocess.run([sys.executable, "-m", "raven.cli", *base, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


def test_evaluate_records_kind_and_dataset_inputs(tmp_path, data_dir):
    """`raven evaluate --experiment`: the experiment is marked model development, the run names its data."""
    from mlflow import MlflowClient

    out = tmp_path / "vae"
    assert main(["train", "--method", "vae", "--limit", "500", "--epochs", "1", "--out", str(out),
                 "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["evaluate", str(out), "--limit", "100", "--probe-limit", "500", "--steps", "2", "--deltas", "0,0.1",
                 "--no-fid", "--no-tsne", "--data-dir", str(data_dir), "--device", "cpu", "--tracking-uri", uri,
                 "--experiment", "raven-cli"]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("raven-cli")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    inputs = {d.dataset.name: (d.tags[0].value, json.loads(d.dataset.profile)["images"])
              for d in run.inputs.dataset_inputs}
    assert inputs == {"mnist-train": ("train", 500), "mnist-test": ("test", 100)}
    assert {"clean_accuracy", "adv_acc_kl_delta_0.1", "adv_acc_w2_delta_0.1"} <= set(run.data.metrics)


def test_flag_fields_make_flags_that_read_back_as_field_values():
    """raven.options.flag_field: a field's flag, its type from the hint, --no-X for a True bool, a None flag."""
    import argparse
    from dataclasses import dataclass

    from raven.config import ConfigError
    from raven.options import add_field_flags, field_flag_values, flag_field

    @dataclass(frozen=True)
    class Settings:
        steps: int = flag_field(5, "steps")
        patience: int | None = flag_field(3, "patience", off=("--never-stop", "no patience"))
        budgets: tuple[float, ...] | None = flag_field(None, "budgets")
        plots: bool = flag_field(True, "skip the plots")
        quick: bool = flag_field(False, "quick")
        hidden: int = 1

    parser = argparse.ArgumentParser()
    add_field_flags(parser, Settings)
    assert field_flag_values(parser.parse_args([]), Settings) == {}
    assert field_flag_values(parser.parse_args(["--steps", "2", "--budgets", "0, 0.5", "--no-plots", "--quick",
                                                "--never-stop"]), Settings) == {
        "steps": 2, "budgets": (0.0, 0.5), "plots": False, "quick": True, "patience": None}
    assert "(default 5)" in parser.format_help() and "--hidden" not in parser.format_help()
    with pytest.raises(ConfigError, match=r"^--budgets expects comma-separated numbers, got '0,x'$"):
        field_flag_values(parser.parse_args(["--budgets", "0,x"]), Settings)
