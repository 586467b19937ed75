"""A model registered in MLflow by the code before the restructure (commit 7b139a4, flat modules)
loads with today's code: MLflow's pickle names raven.models.RavenModel, which stayed where it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow
import pytest
import torch

from raven.models import RavenModel

BEFORE = "7b139a4"  # the last commit of the flat layout
REPO = Path(__file__).resolve().parents[1]

OLD_SCRIPT = """
import json, sys
import mlflow, torch
from mlflow import MlflowClient
from raven import tracking
from raven.config import TrainConfig
from raven.data import load_splits
from raven.train import train

uri, out = sys.argv[1], sys.argv[2]
splits = load_splits("mnist", None, "cpu", limit=300)
model = train(TrainConfig(method="raven", epochs=1, limit=300, sigma_aug=0.2), splits=splits, device="cpu").model
client = MlflowClient(uri)
experiment = client.create_experiment("old")
run = client.create_run(experiment)
info = tracking.log_model(uri, run.info.run_id, model)
mlflow.set_tracking_uri(uri)
version = mlflow.register_model(info.model_uri, "raven-mnist-raven")
with torch.no_grad():
    mu = model.encoder(splits.test_x[:5])[0]
json.dump({"version": version.version, "mu": mu.tolist(), "module": type(model).__module__}, open(out, "w"))
"""


def _old_tree(tmp_path: Path) -> Path:
    archive = tmp_path / "old.tar"
    made = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), BEFORE, "raven"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this clone ({made.stderr.strip()})")
    old = tmp_path / "old"
    with tarfile.open(archive) as tar:
        tar.extractall(old, filter="data")
    return old


def test_a_model_registered_before_the_restructure_loads_after_it(tmp_path, data_dir):
    old = _old_tree(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "old.json"
    env = {**os.environ, "PYTHONPATH": str(old), "RAVEN_DATA_DIR": str(data_dir)}
    done = subprocess.run([sys.executable, "-c", OLD_SCRIPT, uri, str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["module"] == "raven.models"

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/raven-mnist-raven/{saved['version']}", map_location="cpu")
    assert isinstance(model, RavenModel)
    assert model.config.method == "raven" and model.config.sigma_aug == 0.2
    from raven.data import load_splits

    x = load_splits("mnist", data_dir, "cpu", limit=300).test_x[:5]
    with torch.no_grad():
        assert torch.equal(model.encoder(x)[0], torch.tensor(saved["mu"]))
