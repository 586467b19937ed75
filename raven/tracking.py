"""The MLflow record of a sweep: one parent run, a child run per trial, an evaluation run per evaluated trial.

Every write goes through `SweepTracker`, which lives on the driver (the head node), so a
sweep works where only the head can reach the tracking store. Runs are found again by
tags, never remembered only in memory, which makes every call idempotent and lets an
interrupted sweep (`--resume`) continue its record without duplicates:

    parent      tags raven.role=sweep,      raven.sweep_name=NAME
    trial       tags raven.role=trial,      raven.trial_id=ID, raven.parent_sweep=NAME,
                     mlflow.parentRunId=<parent>, raven.checkpoint=<latest Tune checkpoint>
    evaluation  tags raven.role=evaluation, raven.trial_id=ID, raven.parent_sweep=NAME,
                     mlflow.parentRunId=<parent>, raven.trial_run_id=<trial run>

The trial run also carries raven.evaluation_run_id once its evaluation exists, and
raven.node_id / raven.node_ids / raven.node_ip: the Ray node its latest epoch ran on and every
node it ran on (a trial restarted after a lost node shows two). Per-epoch metrics are logged
with step=epoch, and an epoch whose `epoch` metric is already in the run is never logged again.

**A tracking store that goes away.** The Tune callback does not write to MLflow directly: it
queues each write (`SweepTracker.submit`) and flushes the queue in order on every callback.
A write that fails because the store cannot be reached (connection refused or reset, a
timeout) or is overloaded (HTTP 5xx / 429: up to 10 tries per write) stays at the head of the
queue, and later ones wait behind it; a write the store rejects (a bad request) is reported
and dropped. The next flush is tried after a backoff (0.5 s doubling to 15 s), so an outage
costs the driver one failed request per backoff step, not minutes per write. While writes
wait they are also saved to `<Tune folder>/mlflow_pending.json`, which `--resume` replays, so
a driver that dies during an outage loses nothing either. At the end of the sweep the queue is drained,
retrying for up to RAVEN_TRACKING_RETRY_S seconds (default 300). Replaying is idempotent:
runs are found by their tags before any is created, an epoch is skipped when its marker is in
the run, and after a failed attempt each metric of the epoch is checked at its step before
it is logged. For http(s) stores, MLflow's own retries are turned down (unless set already):
MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1,
MLFLOW_HTTP_REQUEST_TIMEOUT=15; the defaults (7 retries, 120 s timeout) would block the
driver for minutes on every write.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

ROLE = "raven.role"
SWEEP_NAME = "raven.sweep_name"
PARENT_SWEEP = "raven.parent_sweep"
TRIAL_ID = "raven.trial_id"
TRIAL_RUN_ID = "raven.trial_run_id"
EVALUATION_RUN_ID = "raven.evaluation_run_id"
CHECKPOINT = "raven.checkpoint"
MODEL_URI = "raven.model_uri"
PARENT_RUN_ID = "mlflow.parentRunId"
EPOCH_MARKER = "epoch"
NODE_ID = "raven.node_id"
NODE_IDS = "raven.node_ids"
NODE_IP = "raven.node_ip"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PENDING_NAME = "mlflow_pending.json"
_PARAM_BATCH = 90  # MLflow accepts at most 100 params per log_batch
_METRIC_BATCH = 900  # and at most 1000 metrics
# MLflow's HTTP client retries a failed request 7 times with a 120 s timeout by default (minutes
# per write while a server is down); the write queue below retries instead.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
RETRY_SECONDS_ENV = "RAVEN_TRACKING_RETRY_S"
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 15.0
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR"}
_SERVER_ERROR_ATTEMPTS = 10  # a write the server keeps answering with an error is given up after this


def resolve_tracking_uri(uri: str | None) -> str:
    """Pin a relative SQLite or file store to an absolute path (the driver's folder at sweep start).

    The URI is stored with the sweep and reused by `--resume`, which may run from elsewhere.
    """
    uri = uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a bare folder: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def git_version(path: str | os.PathLike | None = None) -> str:
    """`<commit>` of the checkout holding `path` (this package by default), `+dirty` when modified."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_param_text(v) for v in value)
    return str(value)[:6000]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def configure_http_retries(tracking_uri: str) -> None:
    """Fail fast on an unreachable http(s) tracking server (the write queue retries); explicit settings win."""
    if tracking_uri.startswith(("http://", "https://")):
        for key, value in HTTP_RETRY_ENV.items():
            os.environ.setdefault(key, value)


def retry_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_SECONDS_ENV, "300")))
    except ValueError:
        return 300.0


def failure_kind(exc: BaseException) -> str | None:
    """'unreachable' (no answer: refused, reset, timed out), 'server' (HTTP 5xx / 429, an overloaded or
    broken store), or None (the store rejected the request: retrying will not help)."""
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return "unreachable"
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "unreachable"
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return None
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


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying later (see failure_kind)."""
    return failure_kind(exc) is not None


class SweepTracker:
    """Find-or-create access to a sweep's runs in one tracking store (picklable; the client is lazy)."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str,
                 pending_path: str | os.PathLike | None = None, log=None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.pending_path = str(pending_path) if pending_path else None
        self._log = log
        self._client = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._logged_epochs: dict[str, set[int]] = {}
        self._params_done: set[str] = set()
        # The write queue (see the module docstring).
        self._queue: list[dict[str, Any]] = []
        self._failures = 0  # consecutive failed flushes
        self._next_try = 0.0
        self._outage_since: float | None = None
        configure_http_retries(tracking_uri)

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "sweep_name": self.sweep_name,
                "pending_path": self.pending_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["experiment"], state["sweep_name"], state.get("pending_path"))

    def _say(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
        else:
            print(f"raven sweep: {line}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ basics

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                self._experiment_id = self.client.create_experiment(self.experiment)
            else:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def _search(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                       order_by=["attributes.start_time ASC"])

    # ------------------------------------------------------------------ parent

    def find_parent(self) -> str | None:
        runs = self._search(f"tags.`{ROLE}` = 'sweep' and tags.`{SWEEP_NAME}` = '{self.sweep_name}'")
        return runs[0].info.run_id if runs else None

    def start_parent(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
        """(run id, created): the sweep's parent run, created with `params` when absent, set RUNNING."""
        run_id = self.find_parent()
        created = run_id is None
        if created:
            run = self.client.create_run(self.experiment_id, run_name=self.sweep_name,
                                         tags={ROLE: "sweep", SWEEP_NAME: self.sweep_name, **(tags or {})})
            run_id = run.info.run_id
            self._log_params(run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
            for key, value in (tags or {}).items():
                self.client.set_tag(run_id, key, value)
        self._parent_id = run_id
        return run_id, created

    @property
    def parent_id(self) -> str:
        if self._parent_id is None:
            self._parent_id = self.find_parent()
            if self._parent_id is None:
                raise RuntimeError(f"no MLflow parent run for sweep {self.sweep_name!r} in {self.tracking_uri}")
        return self._parent_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        fresh = [Param(str(k), _param_text(v)) for k, v in params.items() if str(k) not in existing]
        for i in range(0, len(fresh), _PARAM_BATCH):
            self.client.log_batch(run_id, params=fresh[i:i + _PARAM_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _finite(v)]
        for i in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + _METRIC_BATCH])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------ trials

    def _child(self, role: str, trial_id: str) -> str | None:
        runs = self._search(f"tags.`{PARENT_RUN_ID}` = '{self.parent_id}' and tags.`{ROLE}` = '{role}' "
                            f"and tags.`{TRIAL_ID}` = '{trial_id}'")
        return runs[0].info.run_id if runs else None

    def trial_run(self, trial_id: str, run_name: str | None = None, params: Mapping[str, Any] | None = None,
                  reopen: bool = False) -> str:
        """The trial's child run, found by raven.trial_id under the parent, else created (RUNNING).

        `reopen` marks a found run RUNNING again (a trial that Tune resumes).
        """
        run_id = self._trial_runs.get(trial_id)
        if run_id is None:
            run_id = self._child("trial", trial_id)
            if run_id is None:
                run = self.client.create_run(
                    self.experiment_id, run_name=run_name,
                    tags={ROLE: "trial", TRIAL_ID: trial_id, PARENT_SWEEP: self.sweep_name,
                          PARENT_RUN_ID: self.parent_id})
                run_id = run.info.run_id
            elif reopen and self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self._trial_runs[trial_id] = run_id
        if params and run_id not in self._params_done:
            self._log_params(run_id, params)
            self._params_done.add(run_id)
        return run_id

    def trial_runs(self) -> dict[str, str]:
        """{trial id: run id} of every trial child of the parent."""
        runs = self._search(f"tags.`{PARENT_RUN_ID}` = '{self.parent_id}' and tags.`{ROLE}` = 'trial'")
        return {r.data.tags[TRIAL_ID]: r.info.run_id for r in runs}

    def logged_epochs(self, run_id: str) -> set[int]:
        if run_id not in self._logged_epochs:
            history = self.client.get_metric_history(run_id, EPOCH_MARKER)
            self._logged_epochs[run_id] = {int(m.step) for m in history}
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
        values = {k: v for k, v in metrics.items() if _finite(v)}
        if verify:
            values = {k: v for k, v in values.items()
                      if not any(m.step == epoch for m in self.client.get_metric_history(run_id, k))}
        # The marker goes last: with it in the run, the epoch counts as logged.
        self.log_metrics(run_id, {**values, EPOCH_MARKER: epoch}, step=epoch)
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

    # ------------------------------------------------------------------ the write queue

    def submit(self, op: dict[str, Any]) -> bool:
        """Queue one trial write (see `_apply` for the kinds) and flush; True when nothing is left waiting."""
        self._queue.append(op)
        return self.flush()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def flush(self, force: bool = False) -> bool:
        """Apply queued writes in order until one cannot reach the store; True when the queue is empty.

        Not tried again before the backoff after a failure has passed, unless `force`.
        """
        if not self._queue:
            return True
        if not force and time.monotonic() < self._next_try:
            self._save_pending()
            return False
        while self._queue:
            op = self._queue[0]
            try:
                self._apply(op)
            except Exception as exc:  # noqa: BLE001 - sorted below
                kind = failure_kind(exc)
                op["attempts"] = int(op.get("attempts", 0)) + 1
                if kind == "unreachable" or (kind == "server" and op["attempts"] < _SERVER_ERROR_ATTEMPTS):
                    self._failures += 1
                    delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (self._failures - 1))
                    self._next_try = time.monotonic() + delay
                    # A request that failed may still have reached the store: read it back before retrying.
                    self._logged_epochs.clear()
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        self._say(f"warning: MLflow tracking store {self.tracking_uri} unreachable "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                  "writes are queued and retried, the sweep goes on")
                    self._save_pending()
                    return False
                self._queue.pop(0)
                self._say(f"warning: MLflow write {op.get('op')} of trial {op.get('trial_id')} rejected and "
                          f"dropped: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                continue
            self._queue.pop(0)
        if self._outage_since is not None:
            self._say(f"MLflow tracking store reachable again after {time.monotonic() - self._outage_since:.0f}s; "
                      "queued writes flushed")
            self._outage_since = None
        self._failures = 0
        self._next_try = 0.0
        self._save_pending()
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Flush until the queue is empty (True) or `timeout` seconds (RAVEN_TRACKING_RETRY_S) have passed."""
        deadline = time.monotonic() + (retry_seconds() if timeout is None else timeout)
        while not self.flush(force=True):
            wait = self._next_try - time.monotonic()
            if time.monotonic() + max(wait, 0.0) > deadline:
                self._say(f"warning: {len(self._queue)} MLflow write(s) could not be delivered to "
                          f"{self.tracking_uri}; kept in {self.pending_path or 'memory'}"
                          f"{' and replayed by --resume' if self.pending_path else ''}")
                return False
            time.sleep(max(wait, 0.05))
        return True

    def load_pending(self) -> int:
        """Queue the writes a previous driver saved in pending_path (ahead of new ones); their count."""
        if not self.pending_path or not Path(self.pending_path).is_file():
            return 0
        try:
            ops = json.loads(Path(self.pending_path).read_text())
        except (OSError, ValueError):
            return 0
        for op in ops:
            op["attempts"] = max(1, int(op.get("attempts", 0)))  # may have reached the store: verify
        self._queue[:0] = ops
        return len(ops)

    def _save_pending(self) -> None:
        if not self.pending_path:
            return
        path = Path(self.pending_path)
        try:
            if self._queue:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(self._queue))
                os.replace(tmp, path)
            elif path.exists():
                path.unlink()
        except OSError:
            pass

    def _apply(self, op: dict[str, Any]) -> None:
        """One queued write: trial (find or create the run), epoch, node, tags, finish."""
        kind, trial_id = op["op"], op["trial_id"]
        run_id = self.trial_run(trial_id, run_name=op.get("run_name"), params=op.get("params"),
                                reopen=bool(op.get("reopen")))
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

    def retrying(self, what: str, fn, timeout: float | None = None):
        """fn(), retried with backoff while the store cannot be reached, for up to `timeout` seconds."""
        deadline = time.monotonic() + (retry_seconds() if timeout is None else timeout)
        delay = _BACKOFF_FIRST
        warned = False
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                if not warned:
                    warned = True
                    self._say(f"warning: MLflow {what}: store unreachable ({type(exc).__name__}); retrying "
                              f"for up to {max(0.0, deadline - time.monotonic()):.0f}s")
                time.sleep(delay)
                delay = min(_BACKOFF_MAX, delay * 2)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    # ------------------------------------------------------------------ evaluations

    def evaluation_run(self, trial_id: str) -> tuple[str | None, str | None]:
        """(run id, status) of the trial's evaluation run, or (None, None)."""
        run_id = self._child("evaluation", trial_id)
        if run_id is None:
            return None, None
        return run_id, self.client.get_run(run_id).info.status

    def new_evaluation_run(self, trial_id: str, run_name: str, params: Mapping[str, Any]) -> str:
        """A fresh evaluation run for the trial; an unfinished earlier one (interrupted) is deleted first."""
        old, status = self.evaluation_run(trial_id)
        if old is not None:
            if status == "FINISHED":
                return old
            self.client.delete_run(old)
        trial_run = self.trial_run(trial_id)
        run = self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags={ROLE: "evaluation", TRIAL_ID: trial_id, PARENT_SWEEP: self.sweep_name,
                  PARENT_RUN_ID: self.parent_id, TRIAL_RUN_ID: trial_run})
        self._log_params(run.info.run_id, params)
        self.client.set_tag(trial_run, EVALUATION_RUN_ID, run.info.run_id)
        return run.info.run_id

    def log_artifacts(self, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), artifact_path)


# ----------------------------------------------------------------------------- Ray Tune callback

from ray.tune import Callback as _TuneCallback  # noqa: E402  (Ray is imported only when a sweep runs)


class MlflowTuneCallback(_TuneCallback):
    """Tune callback on the driver: a child run per trial with per-epoch metrics, status, node and checkpoint tags.

    Tune pickles it with the experiment (tuner.pkl) and restores it on `--resume`; it holds no
    state of its own beyond the tracker settings: runs and logged epochs are found in MLflow.
    Every write goes through the tracker's queue, so an unreachable store delays writes
    without losing them (module docstring); a write the store rejects is reported and
    dropped, and neither stops the sweep.
    """

    def __init__(self, tracker: SweepTracker, spec: dict[str, Any]) -> None:
        self.tracker = tracker
        self.spec = spec
        self._sweep = None
        self._warned: set[str] = set()
        self._nodes: dict[str, str] = {}  # trial id -> node id of its last recorded epoch

    def __getstate__(self) -> dict[str, Any]:
        return {"tracker": self.tracker, "spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracker"], state["spec"])

    @property
    def sweep(self):
        if self._sweep is None:
            from raven.sweep import SweepSpec

            self._sweep = SweepSpec.from_dict(self.spec)
        return self._sweep

    def _guard(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the sweep goes on; the record shows the gap
            if what not in self._warned:
                self._warned.add(what)
                print(f"raven sweep: warning: MLflow {what} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    def _submit(self, what: str, op: dict[str, Any]) -> None:
        self._guard(what, lambda: self.tracker.submit(op))

    def _trial_op(self, trial) -> dict[str, Any]:
        from raven.sweep import trial_label, trial_params

        params = {k: (list(v) if isinstance(v, tuple) else v)
                  for k, v in trial_params(self.sweep, trial.config, trial.trial_id).items()}
        return {"op": "trial", "trial_id": trial.trial_id, "reopen": True, "params": params,
                "run_name": trial_label(self.sweep, trial.config, trial.trial_id)}

    def _epoch_op(self, trial, metrics: dict[str, Any]) -> dict[str, Any] | None:
        from raven.sweep import epoch_metrics

        if metrics.get("epoch") is None:
            return None
        return {"op": "epoch", "trial_id": trial.trial_id, "epoch": int(metrics["epoch"]),
                "metrics": epoch_metrics(metrics)}

    def _backfill(self, trial) -> None:
        """Epochs reported while the driver was down are in the checkpoint's reported.json."""
        from raven.sweep import REPORTED_NAME

        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            path = Path(folder) / REPORTED_NAME
            history = json.loads(path.read_text()) if path.is_file() else []
        for metrics in history:
            op = self._epoch_op(trial, metrics)
            if op is not None:
                self._submit("epoch logging", op)
        nodes = [m["node_id"] for m in history if isinstance(m.get("node_id"), str) and m["node_id"]]
        if nodes:
            self._submit("node tag", {"op": "node", "trial_id": trial.trial_id, "node_id": nodes[-1],
                                      "history": nodes})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._submit("trial start", self._trial_op(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        op = self._epoch_op(trial, result)
        if op is not None:
            self._submit("epoch logging", op)
        node = result.get("node_id")
        if isinstance(node, str) and node and self._nodes.get(trial.trial_id) != node:
            self._nodes[trial.trial_id] = node
            self._submit("node tag", {"op": "node", "trial_id": trial.trial_id, "node_id": node,
                                      "node_ip": str(result.get("node_ip") or "")})
        if result.get("epoch") is not None:
            from raven.sweep import OBJECTIVE

            parts = [f"{key} {result[key]:.4g}" for key in ("train_loss", "val_elbo", OBJECTIVE)
                     if isinstance(result.get(key), (int, float))]
            where = f" on node {node[:8]}" if isinstance(node, str) and node else ""
            print(f"raven sweep: trial {trial.trial_id} epoch {int(result['epoch'])}/"
                  f"{self.sweep.train.get('epochs')}{where}: {', '.join(parts)}", file=sys.stderr, flush=True)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._submit("checkpoint tag", {"op": "tags", "trial_id": trial.trial_id, "tags": {CHECKPOINT: checkpoint.path}})

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # Tune registers a checkpoint only after a round trip to the trial; one the trial stored just
        # before it died is found in storage by the trainable itself (raven.sweep.sweep_trial).
        restored = (trial.checkpoint.path if trial.checkpoint is not None
                    else "its newest complete checkpoint in storage, if any (none registered yet)")
        print(f"raven sweep: trial {trial.trial_id} failed (failure {trial.num_failures}; see "
              f"{trial.error_file}); it restarts from {restored}", file=sys.stderr, flush=True)
        self._submit("trial restart tag", {"op": "tags", "trial_id": trial.trial_id,
                                           "tags": {"raven.trial_restarts": trial.num_failures}})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        from raven.sweep import OBJECTIVE

        self._guard("trial completion", lambda: self._backfill(trial))
        self._submit("trial completion", {"op": "tags", "trial_id": trial.trial_id,
                                          "tags": {"raven.trial_status": "TERMINATED"}})
        self._submit("trial completion", {"op": "finish", "trial_id": trial.trial_id, "status": "FINISHED"})
        value = (trial.last_result or {}).get(OBJECTIVE)
        text = f"{OBJECTIVE}={value:.4f}" if isinstance(value, (int, float)) else "no objective"
        print(f"raven sweep: trial {trial.trial_id} finished: {text}", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._submit("trial error", {"op": "tags", "trial_id": trial.trial_id,
                                     "tags": {"raven.trial_status": "ERROR", "raven.error_file": trial.error_file or ""}})
        self._submit("trial error", {"op": "finish", "trial_id": trial.trial_id, "status": "FAILED"})
        print(f"raven sweep: trial {trial.trial_id} failed (see {trial.error_file})", file=sys.stderr, flush=True)

    def on_step_end(self, iteration, trials, **info) -> None:
        # Writes queued during an outage go out as soon as the store is back, not only at the next result.
        if self.tracker.pending:
            self._guard("queued writes", self.tracker.flush)

    def on_experiment_end(self, trials, **info) -> None:
        if self.tracker.pending:
            self._guard("queued writes", lambda: self.tracker.drain(timeout=min(60.0, retry_seconds())))
