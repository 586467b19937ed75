"""The Ray Tune trainable: what runs in a trial, on a Ray worker.

`sweep_trial`, a function trainable: a trial trains the `--seeds` seeds of one configuration as
one pack (`raven.pack.train_pack`; a pack of one is the solo loop) and reports every epoch the
statistics over its seeds (raven.sweep.selection.seed_statistics: the mean of every metric under
its own name, which the searcher and ASHA see, and with several seeds the std and each seed's
value), the Ray node it ran on and the objective when due, with a Tune checkpoint: a seed-S/
folder per seed (checkpoint.pt, metrics.json, as `raven train --seeds` writes them) and the
reported history. A restored trial copies its Tune checkpoint back (or a newer complete one it
finds in storage) and resumes every seed exactly where it stopped. A failed trial (a lost node, a
crashed worker) is restarted that way, on any node, up to `max_failures` times. A seed that
diverges leaves the pack and the means (its last good checkpoint stays); a trial whose every seed
diverged fails. The driver side (the Tuner, its callbacks) is raven.sweep.tune.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from raven.pack import member_dirname, train_pack
from raven.record.write_queue import write_atomic
from raven.sweep.selection import seed_statistics, validation_objective
from raven.sweep.spec import SweepSpec
from raven.train import CHECKPOINT_NAME, EpochReport, TrainingDiverged, load_state, resolve_device

REPORTED_NAME = "reported.json"


# ----------------------------------------------------------------------------- naming


def trial_label(spec: SweepSpec, config: dict[str, Any], trial_id: str | None = None, seed: int | None = None) -> str:
    """sigma_aug=0.01 [id]; with several seeds, `seeds 0-4` for the trial, `seed=3` for one of them."""
    text = f"{spec.param}={float(config[spec.param]):.4g}"
    if spec.seeds > 1:
        text += f" seed={seed}" if seed is not None else f" seeds {spec.seed_list[0]}-{spec.seed_list[-1]}"
    return f"{text} [{trial_id}]" if trial_id else text


def trial_params(spec: SweepSpec, config: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """A run's params: the TrainConfig of the trial (its seed the list of its seeds when it has several)
    or of one of its seeds (an evaluation run). The Tune trial id is a tag (raven.trial_id) and in the run's
    name, not a param: MLflow's compare view charts every param that differs between runs, and an id is no axis.
    A log-uniform search adds log10_PARAM: MLflow's charts have linear axes only, and on them the small values
    of a range spanning decades crowd into one corner."""
    repeat = 0 if seed is None else spec.seed_list.index(seed)
    params = spec.train_config(config[spec.param], repeat).to_dict()
    if seed is None and spec.seeds > 1:
        params["seed"] = list(spec.seed_list)
    if spec.space.is_log_uniform:
        params[f"log10_{spec.param}"] = round(math.log10(float(config[spec.param])), 6)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


# ----------------------------------------------------------------------------- the trainable


def _newest_saved_checkpoint(trial_dir: Path, after_epoch: int, seeds: tuple[int, ...]) -> Path | None:
    """A complete checkpoint folder of this trial newer than `after_epoch`, if storage holds one.

    Tune registers a reported checkpoint only when a later step of its loop processes it,
    so a driver stopped in between (Ctrl-C right after an epoch, or killed) restores the
    previous one, or none, although the newer files are in storage. Only filesystem
    storage is scanned; a folder is used when every seed's checkpoint.pt loads and the
    furthest is at the reported epoch (a seed that diverged stays at its last good one).
    """
    found = []
    for folder in trial_dir.glob("checkpoint_*") if trial_dir.is_dir() else []:
        try:
            history = json.loads((folder / REPORTED_NAME).read_text())
            epoch = int(history[-1]["epoch"]) if history else 0
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
        if epoch > after_epoch:
            found.append((epoch, folder))
    for epoch, folder in sorted(found, reverse=True):
        try:
            epochs = [int(load_state(folder / member_dirname(seed) / CHECKPOINT_NAME).get("epoch", -1))
                      for seed in seeds]
        except Exception:  # noqa: BLE001 - missing or partly copied: try an older one
            continue
        if max(epochs) == epoch:
            return folder
    return None


def _restore(work: Path, spec: SweepSpec) -> list[dict[str, Any]]:
    """Copy the trial's latest checkpoint (every seed's folder) into `work`; the epochs it had reported."""
    reported: list[dict[str, Any]] = []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, work, dirs_exist_ok=True)
        if (work / REPORTED_NAME).is_file():
            reported = json.loads((work / REPORTED_NAME).read_text())
    newer = _newest_saved_checkpoint(spec.experiment_dir / f"trial_{tune.get_context().get_trial_id()}",
                                     after_epoch=len(reported), seeds=spec.seed_list)
    if newer is not None:
        shutil.copytree(newer, work, dirs_exist_ok=True)
        reported = json.loads((work / REPORTED_NAME).read_text())
    return reported


class EpochReporter:
    """The train_pack callback of a trial: each seed's objective when due, the statistics over the
    seeds (raven.sweep.selection.seed_statistics) and the trial's own numbers, then tune.report with a
    checkpoint of `work`.

    The trial's own numbers: epoch, node_id, epoch_seconds (the pack's epoch), images_per_second
    (the pack's: every seed's images) and objective_seconds (all seeds' objectives).
    """

    def __init__(self, spec: SweepSpec, splits, work: Path, reported: list[dict[str, Any]]) -> None:
        self.spec, self.splits, self.work, self.reported = spec, splits, work, reported
        self.node_id = ray.get_runtime_context().get_node_id()
        self.sent = 0

    def __call__(self, reports: list[EpochReport]) -> None:
        # Nothing to say for an epoch whose every seed diverged; and a seed that diverged before an
        # interruption trains again up to its divergence on resume, in epochs already reported.
        if not reports or reports[0].epoch <= len(self.reported):
            return
        settings = self.spec.objective_settings
        members: dict[int, dict[str, float]] = {}
        objective_s: float | None = None
        for report in reports:
            metrics = {k: float(v) for k, v in report.metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if settings.due(report.epoch, report.config.epochs, last=report.last):
                started = time.perf_counter()
                metrics.update(validation_objective(report.model, self.splits, settings))
                objective_s = (objective_s or 0.0) + time.perf_counter() - started
            members[report.config.seed] = metrics
        result: dict[str, Any] = seed_statistics(members)
        result["epoch"] = reports[0].epoch
        result["node_id"] = self.node_id  # the Ray node this epoch ran on (MLflow tags raven.node_id(s))
        result["epoch_seconds"] = reports[0].metrics["epoch_seconds"]
        result["images_per_second"] = sum(m["images_per_second"] for m in members.values())
        if objective_s is not None:
            result["objective_seconds"] = objective_s
        self.reported.append(result)
        write_atomic(self.work / REPORTED_NAME, json.dumps(self.reported))
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(self.work)))
        self.sent += 1

    def close(self) -> None:
        if self.sent == 0 and self.reported:
            # Restored from the checkpoint of its last epoch (the driver stopped before it
            # recorded the trial as finished): report the final result again.
            tune.report(self.reported[-1])


def sweep_trial(config: dict[str, Any], splits, spec: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one configuration's seeds as one pack, report every epoch with a checkpoint.

    `splits` is the DataSplits from the object store (passed with tune.with_parameters), `spec`
    the SweepSpec as a dict. A trial restored by Tune (resume, node failure) continues every
    seed from its latest checkpoint's epoch with the same RNG state (`train_pack(..., resume=True)`).
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not one "Checkpoint created" line per epoch
    sweep = SweepSpec.from_dict(spec)
    configs = sweep.train_configs(config[sweep.param])
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    device = resolve_device("auto")
    if splits.device != device:
        splits = splits.to(device)
    work = Path(tempfile.mkdtemp(prefix="raven-trial-"))
    try:
        reporter = EpochReporter(sweep, splits, work, _restore(work, sweep))
        results = train_pack(configs, splits=splits, device=device,
                             out_dirs=[work / member_dirname(c.seed) for c in configs], pack_callbacks=[reporter],
                             resume=True, progress=False)
        diverged = [f"seed {r.config.seed}: {r.diverged}" for r in results if r.diverged]
        if len(diverged) == len(results):
            raise TrainingDiverged("; ".join(diverged))
        for line in diverged:
            print(f"raven sweep: {trial_label(sweep, config)}: {line}; the other seeds went on", file=sys.stderr)
        reporter.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
