"""A sweep's runs in one tracking store: `SweepTracker`, found-or-created by tags, written through
the sweep's one `raven.record.write_queue.WriteQueue` (see raven.record.tracking for the record's shape).

`SweepTracker` lives on the driver (the head node), so only the head needs the tracking store.
Runs are found again by tags, never remembered only in memory, so every call is idempotent and
`--resume` continues a record without duplicates. A sweep has one tracker, and so one queue, per
process: a tracker unpickled where its sweep's tracker is open (Tune restoring its callbacks on
the driver) is that tracker (`sweep_tracker`).
"""

from __future__ import annotations

import os
import sys
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

from mlflow import MlflowClient

from raven.record.tracking import (
    EPOCH_MARKER,
    EVALUATION_ROLE,
    EVALUATION_RUN_ID,
    NODE_ID,
    NODE_IDS,
    NODE_IP,
    PARENT_RUN_ID,
    PARENT_SWEEP,
    ROLE,
    SEED,
    SWEEP_NAME,
    SWEEP_ROLE,
    TRIAL_ID,
    TRIAL_ROLE,
    TRIAL_RUN_ID,
    configure_http_retries,
    experiment_id,
    failure_kind,
    finite,
    log_inputs,
    log_metrics,
    log_params,
)
from raven.record.write_queue import WriteQueue

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
                           seed: int | None = None, start_time: int | None = None) -> str:
        """A fresh evaluation run for the trial (its seed `seed`); an unfinished earlier one (interrupted)
        is deleted first. The trial run's raven.evaluation_run_id lists its evaluation runs in seed order.
        start_time: the run's start in epoch milliseconds (default now)."""
        old, status = self.evaluation_run(trial_id, seed)
        if old is not None:
            if status == "FINISHED":
                return old
            self.client.delete_run(old)
        trial_run = self.trial_run(trial_id)
        tags = {ROLE: EVALUATION_ROLE, TRIAL_ID: trial_id, PARENT_SWEEP: self.sweep_name, PARENT_RUN_ID: self.parent_id,
                TRIAL_RUN_ID: trial_run, **({SEED: str(seed)} if seed is not None else {})}
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags,
                                        start_time=start_time).info.run_id
        log_params(self.client, run_id, params)
        runs = sorted(self._children(EVALUATION_ROLE, trial_id), key=lambda r: int(r.data.tags.get(SEED, -1)))
        self.client.set_tag(trial_run, EVALUATION_RUN_ID, ",".join(r.info.run_id for r in runs))
        return run_id
