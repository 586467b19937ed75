"""The MLflow record (raven.record.tracking, raven.record.provenance): experiment kind, one log_evaluation, dataset inputs, registry."""

from __future__ import annotations

import hashlib
import json

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from raven.eval.evaluate import EvalResult
from raven.record import tracking
from raven.record.provenance import dataset_inputs


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); each test uses its own experiment."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}")


def test_raven_experiments_open_as_model_development(client):
    new = tracking.experiment_id(client, "raven-new")
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    old = client.create_experiment("made-before")  # an experiment an earlier raven created: marked on use
    assert tracking.experiment_id(client, "made-before") == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    other = client.create_experiment("genai", tags={tracking.EXPERIMENT_KIND: "genai_development"})
    tracking.experiment_id(client, "genai")  # someone's deliberate choice is kept
    assert client.get_experiment(other).tags[tracking.EXPERIMENT_KIND] == "genai_development"
    client.delete_experiment(new)
    assert tracking.experiment_id(client, "raven-new") == new
    assert client.get_experiment(new).lifecycle_stage == "active"


def test_dataset_inputs_digest_the_files_and_the_split(client, data_dir):
    inputs = dataset_inputs("mnist", data_dir, {"train": 1000, "validation": 5000, "test": 200})
    assert [i["name"] for i in inputs] == ["mnist-train", "mnist-validation", "mnist-test"]
    # Independently: sha256 of the raw test files, then of the split's definition.
    test_files = sorted((data_dir / "MNIST" / "raw").glob("t10k-*"))
    files = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(test_files, key=lambda p: "labels" in p.name)]
    definition = {"images": 200, "split_seed": 0, "validation_size": None}
    assert inputs[2]["digest"] == hashlib.sha256(json.dumps([files, definition]).encode()).hexdigest()[:16]
    again = dataset_inputs("mnist", data_dir, {"train": 1000, "validation": 5000, "test": 200})
    assert again == inputs
    assert dataset_inputs("mnist", data_dir, {"train": 2000})[0]["digest"] != inputs[0]["digest"]

    run_id = client.create_run(tracking.experiment_id(client, "inputs")).info.run_id
    tracking.log_inputs(client, run_id, inputs)
    tracking.log_inputs(client, run_id, inputs)  # a replayed write adds nothing
    logged = client.get_run(run_id).inputs.dataset_inputs
    assert sorted((d.dataset.name, d.dataset.digest, d.tags[0].value) for d in logged) == \
        sorted((i["name"], i["digest"], i["split"]) for i in inputs)
    assert json.loads(logged[0].dataset.profile)["split_seed"] == 0
    assert json.loads(logged[0].dataset.source)["uri"] == str(data_dir / "MNIST" / "raw")


def test_log_evaluation_writes_every_metric_curve_param_and_file(client, tmp_path):
    plot = tmp_path / "tsne.png"
    plot.write_bytes(b"png")
    result = EvalResult(clean_accuracy=0.9, adversarial_accuracy={"kl": {"0": 0.9, "0.05": 0.6, "0.1": 0.3}},
                        attack_dissimilarity={"kl": {"0": 0.0, "0.05": 1.0, "0.1": 2.0}}, mse=1000.0, fid=None,
                        fid_note=None, latent_pair_distance={"mean": 0.1, "std": 0.01}, cluster_accuracy=None,
                        settings={"steps": 50, "probe": {"max_iter": 500}, "eval_config": {"limit": 100}},
                        label="vae", artifacts=[plot])
    run_id = client.create_run(tracking.experiment_id(client, "evaluation")).info.run_id
    tracking.log_evaluation(client, run_id, result)
    run = client.get_run(run_id)
    assert run.data.metrics["adv_acc_kl_delta_0.05"] == 0.6 and run.data.metrics["mse_255"] == 1000.0
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "adv_acc_kl")] == \
        [(0, 0.9), (50, 0.6), (100, 0.3)]
    assert run.data.params["eval.steps"] == "50" and run.data.params["eval.probe.max_iter"] == "500"
    assert run.data.params["eval.config.limit"] == "100" and run.data.params["eval.label"] == "vae"
    assert [a.path for a in client.list_artifacts(run_id, "robustness")] == ["robustness/tsne.png"]


def test_a_model_logs_into_a_run_of_another_experiment_than_the_active_one(client):
    mlflow.set_tracking_uri(client.tracking_uri)
    tracking.use_experiment("somewhere-else")
    run = client.create_run(tracking.experiment_id(client, "registry"))
    model = tracking.log_model(client.tracking_uri, run.info.run_id, torch.nn.Linear(2, 1))
    assert model.model_uri and client.get_run(run.info.run_id).info.experiment_id == run.info.experiment_id


def test_registering_the_same_model_twice_makes_one_version(client, tmp_path):
    run_id = client.create_run(tracking.experiment_id(client, "registry")).info.run_id
    model = tracking.log_model(client.tracking_uri, run_id, torch.nn.Linear(2, 1))
    tags = {tracking.SWEEP_NAME: "sweep-a", tracking.TRIAL_ID: "t1"}
    name = tracking.registered_model_name("mnist", "raven")
    first = tracking.register_model(client, name, model.model_uri, model.model_id, run_id, tags)
    assert tracking.register_model(client, name, model.model_uri, model.model_id, run_id, tags) == first
    other = tracking.register_model(client, name, model.model_uri, model.model_id, run_id, {**tags, tracking.TRIAL_ID: "t2"})
    assert (first, other) == ("1", "2")
    version = client.get_model_version(name, first)
    assert name == "raven-mnist-raven" and version.tags == tags and version.run_id == run_id
