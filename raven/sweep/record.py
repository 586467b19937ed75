"""The sweep driver's own MLflow writes, queued behind the trials' in the sweep's one write queue.

While the tracking store is away the driver goes on from what it holds: Tune's results, the
checkpoints, the evaluation folders. What it would write waits in the tracker's queue
(raven.record.write_queue) behind the trials' writes, in order, saved to mlflow_pending.json, and
`--resume` replays it. An op is JSON that names files, never objects:

    forget      {known}: delete the runs of trials the restored Tune state does not know (--resume)
    evaluation  {trial_id, seed, folder, artifacts, run_name, params, inputs, device, node, seconds, began_at}:
                one seed's evaluation run, from its folder (robustness.json, its files, checkpoint.pt);
                the run starts at began_at (epoch seconds) and lasts `seconds`, whenever it is written
    parent      {status}: the parent run ended early (KILLED, FAILED)
    close       {metrics, artifacts, table, best}: the parent's results, the best evaluated model
                registered, the parent FINISHED; the last write of a sweep whose work is done

Every op may be retried after it reached the store (its answer lost), so each is idempotent:
lost trials are looked up again; an evaluation counts as recorded once its run is FINISHED
with its model (raven.model_uri, written last), and is written afresh otherwise; a retried
close logs only the metrics and the table the parent lacks; the registry keeps one version
per set of tags.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from raven.eval.results import JSON_NAME, EvalResult
from raven.record.sweep_tracker import SweepTracker
from raven.record.tracking import (
    CHECKPOINT,
    EVAL_DEVICE,
    EVAL_NODE,
    EVALUATION_RUN_ID,
    MODEL_URI,
    REGISTERED_MODEL,
    SEED,
    SWEEP_NAME,
    TRIAL_ID,
    TRIAL_RUN_ID,
    log_evaluation,
    log_inputs,
    log_metrics,
    log_model,
    register_model,
)
from raven.train import CHECKPOINT_NAME, load_checkpoint


def load_result(folder: Path, artifacts: Iterable[str]) -> EvalResult:
    """The EvalResult an evaluation saved as robustness.json in `folder`, with its files there."""
    data = json.loads((folder / JSON_NAME).read_text())
    fields = {f.name for f in dataclasses.fields(EvalResult)}
    result = EvalResult(**{k: v for k, v in data.items() if k in fields})
    result.artifacts = [folder / name for name in artifacts]
    return result


class SweepRecord(SweepTracker):
    """A sweep's tracker on the driver: the trials' writes (raven.record.tracking) and the driver's own (above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.evaluation_runs: dict[tuple[str, int], str] = {}  # (trial id, seed) -> its recorded evaluation run

    def apply(self, op: dict[str, Any]) -> None:
        handler = {"forget": self._forget, "evaluation": self._evaluation, "parent": self._parent,
                   "close": self._close}.get(op["op"])
        if handler is None:
            super().apply(op)
        else:
            handler(op)

    def closing_queued(self) -> bool:
        """The queue holds the parent's close: the sweep's work was done, only its record waits."""
        return any(op["op"] == "close" for op in self.queue.ops)

    def finished_evaluation(self, trial_id: str, seed: int) -> dict[str, Any] | None:
        """The seed's recorded evaluation, {run_id, metrics, model_uri}, or None."""
        run_id, status = self.evaluation_run(trial_id, seed)
        if status != "FINISHED":
            return None
        run = self.client.get_run(run_id)
        if not run.data.tags.get(MODEL_URI):
            return None
        self.evaluation_runs[trial_id, seed] = run_id
        return {"run_id": run_id, "metrics": dict(run.data.metrics), "model_uri": run.data.tags[MODEL_URI]}

    def _forget(self, op: dict[str, Any]) -> None:
        known = set(op["known"])
        for trial_id, run_id in self.trial_runs().items():
            if trial_id not in known:
                self.client.delete_run(run_id)
                self._trial_runs.pop(trial_id, None)
                self._log(f"trial {trial_id} started after Tune last saved the sweep's state and is not resumed "
                          f"(a new trial takes its place); its MLflow run {run_id} is deleted")

    def _evaluation(self, op: dict[str, Any]) -> None:
        trial_id, seed, folder = op["trial_id"], int(op["seed"]), Path(op["folder"])
        if self.finished_evaluation(trial_id, seed) is not None:
            return
        old, status = self.evaluation_run(trial_id, seed)
        if status == "FINISHED":  # an earlier try ended before it recorded the model: written afresh
            self.client.delete_run(old)
        began = op.get("began_at")  # absent from ops queued before it existed: the run then spans its writing
        run_id = self.new_evaluation_run(trial_id, op["run_name"], op["params"], seed=seed,
                                         start_time=None if began is None else int(1000 * began))
        log_evaluation(self.client, run_id, load_result(folder, op["artifacts"]))
        log_inputs(self.client, run_id, op["inputs"])
        checkpoint = folder / CHECKPOINT_NAME
        self.client.log_artifact(run_id, str(checkpoint), "checkpoint")
        model = log_model(self.tracking_uri, run_id, load_checkpoint(checkpoint, map_location="cpu"))
        self.set_tags(run_id, {EVAL_DEVICE: op["device"], EVAL_NODE: op["node"], CHECKPOINT: str(checkpoint),
                               TRIAL_RUN_ID: self.trial_run(trial_id)})
        log_metrics(self.client, run_id, {"eval_seconds": op["seconds"]})
        if began is not None:  # log_model ended the run now; its duration is the evaluation's, not the write's
            self.client.set_terminated(run_id, "FINISHED", end_time=int(1000 * (began + op["seconds"])))
        self.set_tags(run_id, {MODEL_URI: model.model_uri})  # last: with it the evaluation counts as recorded
        self.evaluation_runs[trial_id, seed] = run_id

    def _parent(self, op: dict[str, Any]) -> None:
        self.finish(self.parent_id, op["status"])

    def _close(self, op: dict[str, Any]) -> None:
        parent = self.parent_id
        retried = int(op.get("attempts", 0)) > 0
        metrics = op["metrics"]
        if retried:
            held = self.client.get_run(parent).data.metrics
            metrics = {k: v for k, v in metrics.items() if held.get(k) != v}
        log_metrics(self.client, parent, metrics)
        self.log_artifacts(parent, op["artifacts"])
        table = op.get("table")
        # MLflow's log_table appends to a table already there.
        if table and not (retried and table["artifact_file"] in {a.path for a in self.client.list_artifacts(parent)}):
            self.client.log_table(parent, data=pd.read_csv(table["csv"]), artifact_file=table["artifact_file"])
        if op.get("best"):
            self._register(parent, op["best"])
        self.finish(parent, "FINISHED")

    def _register(self, parent: str, best: dict[str, Any]) -> None:
        trial_id, seed, name = best["trial_id"], int(best["seed"]), best["name"]
        found = self.finished_evaluation(trial_id, seed)
        if found is None:
            self._log(f"warning: the best model (trial {trial_id}, seed {seed}) is not registered: "
                      "its evaluation is not in MLflow")
            return
        uri = found["model_uri"]
        version = register_model(self.client, name, uri, uri.removeprefix("models:/"), found["run_id"],
                                 {SWEEP_NAME: self.sweep_name, TRIAL_ID: trial_id, SEED: str(seed),
                                  EVALUATION_RUN_ID: found["run_id"]})
        self.set_tags(parent, {REGISTERED_MODEL: f"{name}/{version}"})
        self._log(f"registered the best evaluated model (trial {trial_id}, seed {seed}) as {name} version {version}")
