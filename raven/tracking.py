"""The MLflow record: every tag, role and experiment name, one `log_evaluation`, dataset inputs, the registry.

Sweeps, the reproduction and `raven evaluate` all write through this module. A sweep's record:

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

`SweepTracker` lives on the driver (the head node), so only the head needs the tracking store.
Runs are found again by tags, never remembered only in memory, so every call is idempotent and
`--resume` continues a record without duplicates. Trial writes go through a
`raven.write_queue.WriteQueue` (ordered, saved to `<Tune folder>/mlflow_pending.json` while the
store is unreachable, replayed by `--resume`); a retried write may have reached the store, so it
is read back first (runs by their tags, epochs by their marker, each metric of a retried epoch at
its step). A sweep has one tracker, and so one queue, per process: a tracker unpickled where its
sweep's tracker is open (Tune restoring its callbacks on the driver) is that tracker
(`sweep_tracker`). For http(s) stores MLflow's own retries are turned down (unless set already) to
MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1,
MLFLOW_HTTP_REQUEST_TIMEOUT=15: the defaults (7 retries, 120 s timeout) would block the driver
for minutes on every write.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlflow
import mlflow.pytorch
import requests
import torch
from mlflow import MlflowClient
from mlflow.data import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException

from raven.evaluate import EvalResult
from raven.write_queue import WriteQueue

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
    """Log each raven.provenance.dataset_inputs entry as an MLflow dataset input, its split as the context tag."""
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


# ----------------------------------------------------------------------------- a sweep's runs

_OPEN: "weakref.WeakValueDictionary[tuple[str, str, str], SweepTracker]" = weakref.WeakValueDictionary()


def sweep_tracker(tracking_uri: str, experiment: str, sweep_name: str,
                  pending_path: str | os.PathLike | None = None) -> "SweepTracker":
    """The sweep's tracker open in this process (newest), else a new one: what an unpickled tracker becomes."""
    return _OPEN.get((tracking_uri, experiment, sweep_name)) or \
        SweepTracker(tracking_uri, experiment, sweep_name, pending_path)


class SweepTracker:
    """Find-or-create access to a sweep's runs in one tracking store (picklable; the client is lazy)."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str,
                 pending_path: str | os.PathLike | None = None, log=None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.pending_path = str(pending_path) if pending_path else None
        self._log = log or (lambda line: print(f"raven sweep: {line}", file=sys.stderr, flush=True))
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._logged_epochs: dict[str, set[int]] = {}
        self._params_done: set[str] = set()
        self.queue = WriteQueue(self.apply, failure_kind, target=f"MLflow tracking store {tracking_uri}",
                                path=pending_path, log=self._log)
        configure_http_retries(tracking_uri)
        _OPEN[tracking_uri, experiment, sweep_name] = self

    def __reduce__(self):
        return sweep_tracker, (self.tracking_uri, self.experiment, self.sweep_name, self.pending_path)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.client, self.experiment)
        return self._experiment_id

    def _search(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                       order_by=["attributes.start_time ASC"])

    # ------------------------------------------------------------------ the parent

    def find_parent(self) -> str | None:
        runs = self._search(f"tags.`{ROLE}` = '{SWEEP_ROLE}' and tags.`{SWEEP_NAME}` = '{self.sweep_name}'")
        return runs[0].info.run_id if runs else None

    def start_parent(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
        """(run id, created): the sweep's parent run, created with `params` when absent, set RUNNING."""
        run_id = self.find_parent()
        created = run_id is None
        tags = {k: str(v) for k, v in (tags or {}).items()}  # REST stores take string tag values only
        if created:
            run_id = self.client.create_run(self.experiment_id, run_name=self.sweep_name,
                                            tags={ROLE: SWEEP_ROLE, SWEEP_NAME: self.sweep_name, **tags}).info.run_id
            log_params(self.client, run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, tags)
        self._parent_id = run_id
        return run_id, created

    @property
    def parent_id(self) -> str:
        if self._parent_id is None:
            self._parent_id = self.find_parent()
            if self._parent_id is None:
                raise RuntimeError(f"no MLflow parent run for sweep {self.sweep_name!r} in {self.tracking_uri}")
        return self._parent_id

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log_artifacts(self, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), artifact_path)

    # ------------------------------------------------------------------ trials

    def _children(self, role: str, trial_id: str, seed: int | None = None) -> list:
        seed_clause = f" and tags.`{SEED}` = '{seed}'" if seed is not None else ""
        return self._search(f"tags.`{PARENT_RUN_ID}` = '{self.parent_id}' and tags.`{ROLE}` = '{role}' "
                            f"and tags.`{TRIAL_ID}` = '{trial_id}'{seed_clause}")

    def _child(self, role: str, trial_id: str, seed: int | None = None) -> str | None:
        runs = self._children(role, trial_id, seed)
        return runs[0].info.run_id if runs else None

    def trial_run(self, trial_id: str, run_name: str | None = None, params: Mapping[str, Any] | None = None,
                  reopen: bool = False, inputs: Iterable[Mapping[str, Any]] = ()) -> str:
        """The trial's child run, found by raven.trial_id under the parent, else created (RUNNING).

        `reopen` marks a found run RUNNING again (a trial that Tune resumes). `params` and the
        dataset `inputs` are logged once per run and driver.
        """
        run_id = self._trial_runs.get(trial_id)
        if run_id is None:
            run_id = self._child(TRIAL_ROLE, trial_id)
            if run_id is None:
                run_id = self.client.create_run(
                    self.experiment_id, run_name=run_name,
                    tags={ROLE: TRIAL_ROLE, TRIAL_ID: trial_id, PARENT_SWEEP: self.sweep_name,
                          PARENT_RUN_ID: self.parent_id}).info.run_id
            elif reopen and self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self._trial_runs[trial_id] = run_id
        if params and run_id not in self._params_done:
            log_params(self.client, run_id, params)
            log_inputs(self.client, run_id, inputs)
            self._params_done.add(run_id)
        return run_id

    def trial_runs(self) -> dict[str, str]:
        """{trial id: run id} of every trial child of the parent."""
        runs = self._search(f"tags.`{PARENT_RUN_ID}` = '{self.parent_id}' and tags.`{ROLE}` = '{TRIAL_ROLE}'")
        return {r.data.tags[TRIAL_ID]: r.info.run_id for r in runs}

    def logged_epochs(self, run_id: str) -> set[int]:
        if run_id not in self._logged_epochs:
            self._logged_epochs[run_id] = {int(m.step) for m in self.client.get_metric_history(run_id, EPOCH_MARKER)}
        return self._logged_epochs[run_id]

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, Any], verify: bool = False) -> bool:
        """Log one epoch's metrics at step=epoch unless that epoch is already in the run (one batch).

        `verify` (a retry after a failed attempt, which may have reached the store): the run is
        read again, and each metric is logged only when it holds nothing at this step yet.
        """
        epoch = int(epoch)
        if verify:
            self._logged_epochs.pop(run_id, None)
        done = self.logged_epochs(run_id)
        if epoch in done:
            return False
        values = {k: v for k, v in metrics.items() if finite(v)}
        if verify:
            values = {k: v for k, v in values.items()
                      if not any(m.step == epoch for m in self.client.get_metric_history(run_id, k))}
        # The marker goes last (log_batch keeps the order): with it in the run, the epoch counts as logged.
        log_metrics(self.client, run_id, {**values, EPOCH_MARKER: epoch}, step=epoch)
        done.add(epoch)
        return True

    def add_node(self, run_id: str, node_id: str, node_ip: str | None = None,
                 history: Iterable[str] | None = None) -> None:
        """Record the Ray node a trial's epoch ran on: raven.node_id (latest), raven.node_ids (all, in order).

        `history`: the nodes of all the trial's epochs in order (its checkpoint's reported.json),
        which also covers epochs whose results never reached the driver.
        """
        tags = self.client.get_run(run_id).data.tags
        nodes = [n for n in tags.get(NODE_IDS, "").split(",") if n]
        if history is not None:
            ordered = list(dict.fromkeys(n for n in history if n))
            nodes = ordered + [n for n in nodes if n not in ordered]
        elif node_id not in nodes:
            nodes = nodes + [node_id]
        new = {NODE_ID: node_id}
        if ",".join(nodes) != tags.get(NODE_IDS):
            new[NODE_IDS] = ",".join(nodes)
        if node_ip:
            new[NODE_IP] = node_ip
        if any(tags.get(k) != v for k, v in new.items()):
            self.set_tags(run_id, new)

    def apply(self, op: dict[str, Any]) -> None:
        """One queued trial write: trial (find or create the run), epoch, node, tags, finish."""
        kind, trial_id = op["op"], op["trial_id"]
        run_id = self.trial_run(trial_id, run_name=op.get("run_name"), params=op.get("params"),
                                reopen=bool(op.get("reopen")), inputs=op.get("inputs") or ())
        if kind == "epoch":
            self.log_epoch(run_id, int(op["epoch"]), op["metrics"], verify=int(op.get("attempts", 0)) > 0)
        elif kind == "node":
            self.add_node(run_id, op["node_id"], op.get("node_ip"), op.get("history"))
        elif kind == "tags":
            self.set_tags(run_id, op["tags"])
        elif kind == "finish":
            self.finish(run_id, op["status"])
        elif kind != "trial":
            raise ValueError(f"unknown queued MLflow write {kind!r}")

    # ------------------------------------------------------------------ evaluations

    def evaluation_run(self, trial_id: str, seed: int | None = None) -> tuple[str | None, str | None]:
        """(run id, status) of the evaluation run of the trial (of its seed `seed`), or (None, None)."""
        run_id = self._child(EVALUATION_ROLE, trial_id, seed)
        if run_id is None:
            return None, None
        return run_id, self.client.get_run(run_id).info.status

    def new_evaluation_run(self, trial_id: str, run_name: str, params: Mapping[str, Any],
                           seed: int | None = None) -> str:
        """A fresh evaluation run for the trial (its seed `seed`); an unfinished earlier one (interrupted)
        is deleted first. The trial run's raven.evaluation_run_id lists its evaluation runs in seed order."""
        old, status = self.evaluation_run(trial_id, seed)
        if old is not None:
            if status == "FINISHED":
                return old
            self.client.delete_run(old)
        trial_run = self.trial_run(trial_id)
        tags = {ROLE: EVALUATION_ROLE, TRIAL_ID: trial_id, PARENT_SWEEP: self.sweep_name, PARENT_RUN_ID: self.parent_id,
                TRIAL_RUN_ID: trial_run, **({SEED: str(seed)} if seed is not None else {})}
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        log_params(self.client, run_id, params)
        runs = sorted(self._children(EVALUATION_ROLE, trial_id), key=lambda r: int(r.data.tags.get(SEED, -1)))
        self.client.set_tag(trial_run, EVALUATION_RUN_ID, ",".join(r.info.run_id for r in runs))
        return run_id
