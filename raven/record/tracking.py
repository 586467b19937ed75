"""The MLflow record: every tag, role and experiment name, one `log_evaluation`, dataset inputs, the registry.

Sweeps, the reproduction (its parent and child runs: the last section) and `raven evaluate` (EvaluationRecord)
all write through this module. A sweep's record:

    parent      tags raven.role=sweep,      raven.sweep_name=NAME
    trial       tags raven.role=trial,      raven.trial_id=ID, raven.parent_sweep=NAME,
                     mlflow.parentRunId=<parent>, raven.checkpoint=<latest Tune checkpoint>
    evaluation  tags raven.role=evaluation, raven.trial_id=ID, raven.seed=S, raven.parent_sweep=NAME,
                     mlflow.parentRunId=<parent>, raven.trial_run_id=<trial run>

A trial trains the seeds of its configuration as one pack and is one run (its metrics the means
over the seeds, `_std` and `_seed<S>` beside them); each evaluated seed has its own evaluation
run. A trial run also carries raven.evaluation_run_id once evaluated (its seeds' evaluation runs,
comma-separated in seed order), and raven.node_id / node_ids / node_ip: the Ray node of its
latest epoch and every node it ran on (two after a lost node).
Per-epoch metrics are logged at step=epoch; an epoch whose `epoch` metric is in the run is never
logged again. Every raven experiment is tagged mlflow.experimentKind = custom_model_development,
MLflow's marker of model development (MLflow 3.17's UI itself lands on the runs in its Model
training mode, which the link a sweep prints selects).

A sweep's runs are written by raven.record.sweep_tracker.SweepTracker through a
`raven.record.write_queue.WriteQueue` (ordered, saved to `<Tune folder>/mlflow_pending.json` while the
store is unreachable, replayed by `--resume`); a retried write may have reached the store, so it
is read back first (runs by their tags, epochs by their marker, each metric of a retried epoch at
its step). For http(s) stores MLflow's own retries are turned down (unless set already) to
MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1,
MLFLOW_HTTP_REQUEST_TIMEOUT=15: the defaults (7 retries, 120 s timeout) would block the driver
for minutes on every write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import mlflow
import mlflow.pytorch
import requests
import torch
from mlflow import MlflowClient
from mlflow.data import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run
from mlflow.exceptions import MlflowException

from raven.eval.results import EvalResult

# Experiments (the sweeps' defaults are also where the reproduction looks their results up).
SIGMA_SWEEP_EXPERIMENT = "raven-sigma-aug"
ETA_SWEEP_EXPERIMENT = "raven-se-eta"
REPRODUCTION_EXPERIMENT = "raven-reproduction"
EVALUATE_EXPERIMENT = "raven-evaluate"
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"

# Roles: the value of the raven.role tag.
ROLE = "raven.role"
SWEEP_ROLE, TRIAL_ROLE, EVALUATION_ROLE = "sweep", "trial", "evaluation"
REPRODUCTION_ROLE, REPRODUCTION_RUN_ROLE = "reproduction", "reproduction-run"

# Tags of a sweep's runs.
SWEEP_NAME = "raven.sweep_name"
SWEEP_KIND = "raven.sweep_kind"
CODE_VERSION = "raven.code_version"
EXPERIMENT_DIR = "raven.experiment_dir"
RAY_CLUSTER = "raven.ray_cluster"
RAY_NODES = "raven.ray_nodes"
OPTUNA_STORAGE = "raven.optuna_storage"
OPTUNA_STUDY = "raven.optuna_study"
PARENT_SWEEP = "raven.parent_sweep"
PARENT_RUN_ID = "mlflow.parentRunId"
TRIAL_ID = "raven.trial_id"
TRIAL_RUN_ID = "raven.trial_run_id"
TRIAL_STATUS = "raven.trial_status"
TRIAL_RESTARTS = "raven.trial_restarts"
ERROR_FILE = "raven.error_file"
EVALUATION_RUN_ID = "raven.evaluation_run_id"
CHECKPOINT = "raven.checkpoint"
MODEL_URI = "raven.model_uri"
REGISTERED_MODEL = "raven.registered_model"
EVAL_DEVICE = "raven.eval_device"
EVAL_NODE = "raven.eval_node"
NODE_ID = "raven.node_id"
NODE_IDS = "raven.node_ids"
NODE_IP = "raven.node_ip"
EPOCH_MARKER = "epoch"  # the metric logged last in an epoch: with it in the run, the epoch counts as logged

# Tags of a reproduction's runs.
DATASET, METHOD, SEED = "raven.dataset", "raven.method", "raven.seed"
BUDGET, BUDGET_TEXT, HYPERPARAMETERS = "raven.budget", "raven.budget_text", "raven.hyperparameters"
COMPLETE_TAG = "raven.complete"  # set last on a reproduction run: its numbers and files are all in the store
FAILED_RUNS, ERROR, IMPORTED_FROM, NOTE = "raven.failed_runs", "raven.error", "raven.imported_from", "raven.note"

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PENDING_NAME = "mlflow_pending.json"
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR"}


# ----------------------------------------------------------------------------- the store


def resolve_tracking_uri(uri: str | None) -> str:
    """Pin a relative SQLite or file store to an absolute path (the driver's folder at start).

    The URI is stored with a sweep and reused by `--resume`, which may run from elsewhere.
    """
    uri = uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a bare folder: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def configure_http_retries(tracking_uri: str) -> None:
    """Fail fast on an unreachable http(s) tracking server (the write queue retries); explicit settings win."""
    if tracking_uri.startswith(("http://", "https://")):
        for key, value in HTTP_RETRY_ENV.items():
            os.environ.setdefault(key, value)


def failure_kind(exc: BaseException) -> str | None:
    """'unreachable' (no answer: refused, reset, timed out), 'server' (HTTP 5xx / 429, an overloaded or
    broken store), or None (the store rejected the request: retrying will not help)."""
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return "unreachable"
    if isinstance(exc, MlflowException):
        text = str(exc)
        if text.startswith("API request to") and ("failed with exception" in text or "timeout" in text):
            return "unreachable"  # MLflow's wrapping of a refused or reset connection, or a timeout
        if "failed with error code 5" in text or "failed with error code 429" in text:
            return "server"
        # A JSON error from the server (RestException); MlflowException's own default code is
        # INTERNAL_ERROR too, so only a REST answer counts here.
        if type(exc).__name__ == "RestException" and getattr(exc, "error_code", None) in _TRANSIENT_CODES:
            return "server"
    return None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment `name` (created when missing, restored when deleted), marked as model development."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    if EXPERIMENT_KIND not in found.tags:  # an experiment someone marked otherwise keeps its kind
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
    return found.experiment_id


def use_experiment(name: str) -> str:
    """mlflow.set_experiment for the fluent API, through `experiment_id` (so the kind tag is set)."""
    return mlflow.set_experiment(experiment_id=experiment_id(MlflowClient(), name)).experiment_id


# ----------------------------------------------------------------------------- params, metrics, evaluations


def param_text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(param_text(v) for v in value)
    return str(value)[:6000]


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings as flat params: {"eval.probe.max_iter": "500", ...} (lists as JSON)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: (json.dumps(value) if isinstance(value, (list, tuple)) else str(value))[:500]}


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the params the run does not hold yet (MLflow refuses to change a logged param)."""
    existing = client.get_run(run_id).data.params
    fresh = [Param(str(k), param_text(v)) for k, v in params.items() if str(k) not in existing]
    client.log_batch(run_id, params=fresh)  # log_batch splits into MLflow's per-request limits itself


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if finite(v)])


def log_evaluation(client: MlflowClient, run_id: str, result: EvalResult) -> None:
    """One evaluation into `run_id`: every metric, the curves, the settings as params, the files.

    Metrics: all of result.metrics(); each curve of result.curves() ({name: {delta_key: value}},
    e.g. adv_acc_kl) at step round(1000 delta). Params: the settings flattened under "eval."
    (keys the run already holds are left alone). Artifacts: result.artifacts under "robustness/".
    """
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics().items() if finite(v)]
    for name, curve in result.curves().items():
        metrics += [Metric(name, float(v), now, int(round(float(key) * 1000))) for key, v in curve.items() if finite(v)]
    client.log_batch(run_id, metrics=metrics)
    settings = {k: v for k, v in result.settings.items() if k not in ("train_config", "eval_config")}
    params = {**flatten("eval", settings), **flatten("eval.config", result.settings.get("eval_config") or {}),
              "eval.label": result.label}
    log_params(client, run_id, params)
    for path in result.artifacts:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), "robustness")


class EvaluationRecord:
    """`raven evaluate`'s MLflow runs, as a context manager: one run per checkpoint and the combined plot.

    With MLFLOW_RUN_ID set and no active run (e.g. under `mlflow run`), that run is resumed for the
    duration. Inside an active run, a single checkpoint is logged into it, several as nested runs;
    else each checkpoint gets its own run in `experiment` (default raven-evaluate).
    """

    def __init__(self, tracking_uri: str | None, experiment: str | None, checkpoints: int) -> None:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID"):
            use_experiment(experiment or EVALUATE_EXPERIMENT)
        self.checkpoints = checkpoints
        self.outer = None

    def __enter__(self) -> "EvaluationRecord":
        if os.environ.get("MLFLOW_RUN_ID") and mlflow.active_run() is None:
            self.outer = mlflow.start_run()  # resumes the run named by MLFLOW_RUN_ID
        return self

    def __exit__(self, *exc: object) -> None:
        if self.outer is not None:
            mlflow.end_run()

    def log(self, result: EvalResult, checkpoint: Path, label: str, inputs: Iterable[Mapping[str, Any]]) -> None:
        """One checkpoint's evaluation (log_evaluation) and the data it read (log_inputs)."""
        nested = mlflow.active_run() is not None
        if nested and self.checkpoints == 1:
            self._log(result, inputs)
        else:
            with mlflow.start_run(run_name=f"evaluate {label} {checkpoint.parent.name}", nested=nested):
                mlflow.set_tag("checkpoint", str(checkpoint.resolve()))
                self._log(result, inputs)

    def _log(self, result: EvalResult, inputs: Iterable[Mapping[str, Any]]) -> None:
        run_id, client = mlflow.active_run().info.run_id, MlflowClient()
        log_evaluation(client, run_id, result)
        log_inputs(client, run_id, inputs)

    def log_curves(self, path: Path) -> None:
        """The combined accuracy-vs-delta plot, into the enclosing run when there is one."""
        if mlflow.active_run() is not None:
            mlflow.log_artifact(str(path), artifact_path="robustness")


# ----------------------------------------------------------------------------- dataset inputs


class _SplitDataset(MetaDataset):
    """A MetaDataset (name, digest, source) that also carries a profile: the split's definition."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        source = get_dataset_source_from_json(json.dumps({"uri": entry["source"]}), source_type="local")
        self._profile = entry["profile"]
        super().__init__(source, name=entry["name"], digest=entry["digest"])

    @property
    def profile(self) -> Any:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_inputs(client: MlflowClient, run_id: str, inputs: Iterable[Mapping[str, Any]]) -> None:
    """Log each raven.record.provenance.dataset_inputs entry as an MLflow dataset input, its split as the context tag."""
    datasets = []
    for entry in inputs:
        fields = _SplitDataset(entry).to_dict()
        datasets.append(DatasetInput(DatasetEntity(
            name=fields["name"], digest=fields["digest"], source_type=fields["source_type"], source=fields["source"],
            profile=fields["profile"]), tags=[InputTag("mlflow.data.context", entry["split"])]))
    if datasets:
        client.log_inputs(run_id, datasets=datasets)


# ----------------------------------------------------------------------------- models and the registry


def registered_model_name(dataset: str, method: str) -> str:
    return f"raven-{dataset}-{method}"


def log_model(tracking_uri: str, run_id: str, model: torch.nn.Module) -> Any:
    """The model as an MLflow model of the run (mlflow.pytorch, pickled); returns its ModelInfo."""
    mlflow.set_tracking_uri(tracking_uri)
    # The fluent API refuses to resume a run outside the process's active experiment (an earlier
    # use_experiment, e.g. by `raven train` in the same process), so make the run's own one active.
    mlflow.set_experiment(experiment_id=MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "raven"])


def register_model(client: MlflowClient, name: str, model_uri: str, model_id: str | None, run_id: str,
                   tags: Mapping[str, str]) -> str:
    """A version of registered model `name` for `model_uri` with `tags`; an existing version with the same
    tags is returned instead (a resumed sweep registers once). Returns the version number."""
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    for version in client.search_model_versions(f"name = '{name}'"):
        if all(version.tags.get(k) == v for k, v in tags.items()):
            return str(version.version)
    return str(client.create_model_version(name, source=model_uri, run_id=run_id, tags=dict(tags),
                                           model_id=model_id).version)


def use_store(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri` (None: MLFLOW_TRACKING_URI, else the sweeps' sqlite:///mlflow.db here)."""
    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(uri)
    return uri


# ----------------------------------------------------------------------------- the reproduction's runs
# raven.reproduce.runner decides what a reproduction records (tags, params, metrics, files); these write it.

EVALUATION_FILES = "robustness/"  # a child's files under this folder are its evaluation's (log_evaluation)


def open_store(tracking_uri: str | None, experiment: str) -> tuple[str, str]:
    """`use_store(tracking_uri)` and make `experiment` active; returns (the resolved URI, the experiment's id)."""
    uri = use_store(tracking_uri)
    return uri, use_experiment(experiment)


def latest_run(experiment_id: str, role: str) -> Run | None:
    """The newest run tagged raven.role = `role` in the experiment, or None."""
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{ROLE}` = '{role}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def get_run(run_id: str) -> Run:
    return MlflowClient().get_run(run_id)


def complete_children(experiment_id: str, parent_id: str) -> list[dict[str, str]]:
    """The tags of the parent's children that are complete (COMPLETE_TAG, FINISHED); the others (a crash while
    logging) are deleted, so that a resume records them again."""
    client = MlflowClient()
    done = []
    for run in client.search_runs([experiment_id], filter_string=f"tags.{PARENT_RUN_ID} = '{parent_id}'",
                                  max_results=50_000):
        if run.data.tags.get(COMPLETE_TAG) == "true" and run.info.status == "FINISHED":
            done.append(dict(run.data.tags))
        else:
            client.delete_run(run.info.run_id)
    return done


@contextlib.contextmanager
def parent_run(run_id: str | None, run_name: str | None, tags: Mapping[str, str],
               params: Mapping[str, Any] | None = None) -> Iterator[str]:
    """The active parent run for the block (`run_id` reopened, else a new run `run_name`); yields its id.
    `params` are logged when given (a new parent)."""
    with mlflow.start_run(run_id=run_id, run_name=run_name, tags=dict(tags)) as run:
        if params is not None:
            log_params(MlflowClient(), run.info.run_id, params)
        yield run.info.run_id


def set_tags(tags: Mapping[str, str]) -> None:
    """Tags on the active (parent) run."""
    mlflow.set_tags(dict(tags))


def log_child_run(name: str, tags: Mapping[str, str], params: Mapping[str, Any], inputs: Iterable[Mapping[str, Any]],
                  history: list[dict[str, float]], *, error: str | None = None,
                  metrics: Mapping[str, float] | None = None, evaluation: EvalResult | None = None,
                  files: Mapping[str, bytes] | None = None) -> str:
    """One child run of the active parent; returns its id.

    Params, dataset inputs, the per-epoch `history` at step = epoch. With `error`: tagged and FAILED, nothing
    more. Else `metrics`, the `evaluation` (log_evaluation, its artifacts the `files` under robustness/), the
    other `files` ({relative path: bytes}) as artifacts in their folders, and COMPLETE_TAG last.
    """
    client = MlflowClient()
    with mlflow.start_run(run_name=name, nested=True, tags=dict(tags)) as run:
        run_id = run.info.run_id
        log_params(client, run_id, params)
        log_inputs(client, run_id, inputs)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, int(row["epoch"]))
                                          for row in history for key, value in row.items() if key != "epoch"])
        if error:
            mlflow.set_tag(ERROR, error[:5000])
            mlflow.end_run(status="FAILED")
            return run_id
        log_metrics(client, run_id, metrics or {})
        with tempfile.TemporaryDirectory() as tmp:
            local = {}
            for relative, data in (files or {}).items():
                path = Path(tmp) / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                local[relative] = path
            if evaluation is not None:
                log_evaluation(client, run_id, dataclasses.replace(
                    evaluation, artifacts=[p for n, p in local.items() if n.startswith(EVALUATION_FILES)]))
            for relative, path in local.items():
                if not relative.startswith(EVALUATION_FILES):
                    client.log_artifact(run_id, str(path), str(Path(relative).parent))
        mlflow.set_tag(COMPLETE_TAG, "true")
        return run_id


def finished_sweeps(experiment: str, dataset: str, param: str) -> list[Run]:
    """The finished sweep parents (raven.role = sweep) of `param` on `dataset` in `experiment`, newest first."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{ROLE}` = '{SWEEP_ROLE}' and params.dataset = '{dataset}' "
                      f"and params.`search.param` = '{param}' and attributes.status = 'FINISHED'")
