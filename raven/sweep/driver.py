"""A hyper-parameter sweep, in the order it runs: open the record, search, rank, evaluate the best, close the record.

One sweep searches one hyper-parameter of one method over its search space (raven.sweep.space;
sweeps/sigma_aug.py: RAVEN's sigma_aug, sweeps/se_eta.py: the Smooth Encoder's eta,
sweeps/tc_beta.py: beta-TCVAE's tc_beta). Ray Tune runs the trials (raven.sweep.tune,
raven.sweep.trial), Optuna proposes them from a persistent study, MLflow records everything
(raven.record.tracking):

1. open the record: writes a previous driver could not deliver, the MLflow parent run (found
   again on --resume), the Optuna study, the saved spec;
2. search: the data is read once on the driver and put in Ray's object store once; every trial
   and evaluation task reads it from there. The time it will take is estimated first
   (raven.sweep.clock); Tune runs the trials; the selection objective(s) are computed on the
   validation split only (raven.sweep.selection);
3. rank: the trials' seeds grouped by searched value (each trial trains its configuration's
   `--seeds` seeds as one pack; seeds averaged), the Pareto front first;
4. evaluate the best: the full robustness evaluation (`raven.eval.evaluate.evaluate_model`: both
   attacks, 50 steps, the paper's delta grid, the test set, FID, t-SNE) of every seed of the
   top configuration(s), as Ray tasks on the cluster's GPUs when it has any; the results come
   back to the driver, which writes every MLflow record;
5. close the record: trials.csv, the study's plots, the Pareto front, the evaluations on the
   parent run; the best evaluated model registered as raven-{dataset}-{method}.

Every MLflow write goes through the sweep's one write queue (raven.record.write_queue; the driver's own
writes are raven.sweep.record's ops), so a tracking store that goes away stops nothing: the
search and the evaluation go on from Tune's results and the checkpoints, reads that only serve
bookkeeping are skipped while the store is down, and the writes wait in order. The driver waits
for the store once, at the end, for at most --tracking-wait seconds; writes still kept then are
named in one last line with the `--resume` that replays them (exit status 75). A `--resume`
whose kept writes include the record's close only replays them: the work was done.
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import torch
from ray.tune import ExperimentAnalysis, Tuner

from raven.config import ConfigError
from raven.data import DataError, DataSplits, load_splits
from raven.eval import plots
from raven.eval.evaluate import CURVES_PNG, EvalConfig, EvalResult, evaluate_model
from raven.pack import member_dirname
from raven.progress import bar, duration, say
from raven.record import tracking
from raven.record.provenance import dataset_inputs
from raven.sweep import report as sweep_report
from raven.sweep.clock import SweepClock, calibrate, evaluation_estimate
from raven.sweep.cluster import (
    EVAL_GPU_SHARE,
    TRIAL_GPU_SHARE,
    ClusterError,
    ClusterInfo,
    check_address,
    connect,
    node_name,
    run_tasks,
)
from raven.sweep.record import SweepRecord
from raven.sweep.selection import candidates, rank_configurations
from raven.sweep.spec import SPEC_NAME, SweepError, SweepSpec, find_resumable, hide_password, spec_from_args
from raven.sweep.study import fail_lost_trials, open_study
from raven.sweep.trial import trial_label, trial_params
from raven.sweep.tune import build_tuner, epochs_in_storage
from raven.train import CHECKPOINT_NAME, load_checkpoint, resolve_device

Log = Callable[[str], None]
WRITES_KEPT = 75  # exit status: the work is done, its MLflow writes are kept for --resume (EX_TEMPFAIL)


@dataclass
class Record:
    """The open MLflow record of a sweep and its Optuna study."""

    tracker: SweepRecord
    parent_id: str
    study: Any  # optuna.Study


# ----------------------------------------------------------------------------- 1. open the record


def open_record(spec: SweepSpec, tracker: SweepRecord, cluster: ClusterInfo, resume: bool, log: Log) -> Record:
    study = open_study(spec, resume)
    if tracker.queue.pending:  # writes a previous driver could not deliver go first
        log(f"replaying {tracker.queue.pending} MLflow write(s) left by the interrupted driver")
        tracker.queue.flush(force=True)  # what the store cannot take now waits in the queue
    try:
        parent_id, created = tracker.start_parent(spec.mlflow_params(), tags={
            tracking.CODE_VERSION: spec.code_version, tracking.SWEEP_KIND: spec.kind,
            tracking.EXPERIMENT_DIR: str(spec.experiment_dir.resolve()),
            tracking.OPTUNA_STORAGE: hide_password(spec.study_storage), tracking.OPTUNA_STUDY: spec.name,
            tracking.RAY_CLUSTER: cluster.address, tracking.RAY_NODES: cluster.nodes})
    except Exception as exc:  # noqa: BLE001 - any tracking-store failure, one line
        raise SweepError(f"cannot write to the MLflow tracking store {spec.tracking_uri}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    study.set_user_attr("mlflow.parent_run_id", parent_id)
    spec.save()
    seeds = f" (seeds {spec.seed_list[0]}-{spec.seed_list[-1]} of each trained as one pack)" if spec.seeds > 1 else ""
    log(f"{'continuing' if resume else 'starting'} sweep {spec.name}: {spec.method} on {spec.dataset}, "
        f"{spec.param} {spec.space}, {spec.num_samples} trials{seeds}, {spec.epochs} epoch(s), "
        f"objectives {','.join(spec.objectives)}; Tune folder {spec.experiment_dir.resolve()}; "
        f"MLflow {spec.tracking_uri} experiment {spec.experiment!r} parent run {parent_id}"
        f"{'' if created else ' (existing)'}; Optuna study in {hide_password(spec.study_storage)}")
    return Record(tracker, parent_id, study)


def resume_command(spec: SweepSpec, address: str | None) -> str:
    """The command that continues this sweep (or replays its kept writes), with the script as it was started."""
    script = sys.argv[0] if Path(sys.argv[0]).name == f"{spec.kind}.py" else f"sweeps/{spec.kind}.py"
    return (f"python {shlex.quote(script)} --resume --name {spec.name} --storage-path {shlex.quote(spec.storage_path)}"
            + (f" --address {shlex.quote(address)}" if address else ""))


def deliver(spec: SweepSpec, tracker: SweepRecord, wait: float, command: str, log: Log) -> bool:
    """The driver's one wait: the queued MLflow writes delivered within `wait` seconds (True); else one line
    naming the store, the writes kept, their file and the command that replays them (False)."""
    queue = tracker.queue
    if queue.flush(force=True):
        return True
    if wait > 0:
        log(f"waiting up to {wait:.0f}s for the {queue.target} to take {queue.pending} queued write(s) "
            "(Ctrl-C stops waiting; they stay kept)")
        try:
            if queue.drain(wait):
                return True
        except KeyboardInterrupt:
            pass
    sys.stdout.flush()
    log(f"{queue.target} unreachable: {queue.pending} write(s) kept in {queue.path}; once it is back, "
        f"replay them with: {command}")
    return False


# ----------------------------------------------------------------------------- 2. search


def _forget_lost_trials(spec: SweepSpec, record: Record, log: Log) -> None:
    """Before --resume restores Tune's saved state: forget the trials that state does not know.

    A driver that dies (SIGKILL, a lost head) may have started trials after Tune last saved its
    experiment state; the restored sweep does not know them and runs new trials in their place.
    Their MLflow runs are deleted by a queued write (soft: `mlflow runs restore --run-id ID` brings
    one back) and their Optuna trials marked FAILED.
    """
    try:
        known: set[str] = set()  # no saved state at all: the resumed sweep starts over (build_tuner)
        if Tuner.can_restore(str(spec.experiment_dir.resolve())):
            known = {t.trial_id for t in ExperimentAnalysis(str(spec.experiment_dir.resolve())).trials}
        record.tracker.queue.submit({"op": "forget", "known": sorted(known)})
        failed = fail_lost_trials(record.study, known)
        if failed:
            log(f"{failed} Optuna trial(s) of trials lost with the driver marked FAILED")
    except Exception as exc:  # noqa: BLE001 - the sweep continues; the study may keep a RUNNING trial
        log(f"warning: trials lost with the driver not checked: {type(exc).__name__}: {exc}")


def finished_trials(spec: SweepSpec) -> int:
    """Trials that ended (TERMINATED or ERROR) in the experiment state Tune saved last.

    After an interrupt (SIGINT) Tune saves the state with the running trials still RUNNING
    (that is what --resume continues) and only then stops them, so the in-memory results
    would count them as terminated; the saved state tells them apart.
    """
    analysis = ExperimentAnalysis(str(spec.experiment_dir.resolve()))
    return sum(1 for trial in analysis.trials if trial.status in ("TERMINATED", "ERROR"))


def estimate(spec: SweepSpec, splits: DataSplits, cluster: ClusterInfo, log: Log) -> SweepClock:
    """The rates calibrated on this machine and the time the sweep will take, printed (raven.sweep.clock)."""
    trial_gpus = cluster.gpus_per(spec.gpus_per_trial, TRIAL_GPU_SHARE)
    eval_gpus = cluster.gpus_per(spec.eval_gpus, EVAL_GPU_SHARE)
    evaluations = spec.evaluate_top * spec.seeds
    eval_cpus = cluster.eval_cpus(spec.eval_cpus, spec.cpus_per_trial, evaluations)
    slots = cluster.slots(spec.cpus_per_trial, trial_gpus)
    # The trials that share the driver's node, as they will share every node: on CPU they slow each other.
    per_node = math.floor(cluster.node_cpus / max(spec.cpus_per_trial, 1e-9)) if cluster.node_cpus else slots
    concurrent = 1 if trial_gpus > 0 else max(1, min(slots, per_node, 8))
    rates = calibrate(spec, splits, eval_on_gpu=eval_gpus > 0, eval_threads=int(eval_cpus), concurrent=concurrent)
    clock = SweepClock.for_spec(spec, rates, slots, cluster.slots(eval_cpus, eval_gpus))
    clock.epochs_done.update(epochs_in_storage(spec))  # a resumed sweep: the epochs its trials trained
    fid = ", FID on CPU" if spec.fid and eval_gpus == 0 else ""
    evaluation = f"evaluation ~{duration(clock.evaluation_left())}{fid}" if spec.evaluate_top else "no final evaluation"
    log(f"estimated time: ~{duration(clock.left())} (search ~{duration(clock.search_left())}: {clock.trials} "
        f"trial(s) x {spec.epochs} epoch(s), {clock.slots} at a time; {evaluation}); calibrated on this machine, "
        "refined as epochs finish")
    return clock


def search(spec: SweepSpec, record: Record, splits: DataSplits, splits_ref, cluster: ClusterInfo,
           clock: SweepClock, data_dir: str | None, resume: bool, log: Log):
    """Tune's search; its ResultGrid, or None when it was interrupted before every trial ended."""
    if resume:
        _forget_lost_trials(spec, record, log)
    inputs = dataset_inputs(spec.dataset, data_dir, {"train": len(splits.train_x[:spec.limit]),
                                                     "validation": len(splits.val_x)}, spec.validation_size)
    tuner = build_tuner(spec, record.tracker, splits_ref, cluster.gpus_per(spec.gpus_per_trial, TRIAL_GPU_SHARE),
                        inputs, clock.rates, clock.slots, clock.eval_slots, resume)
    results = tuner.fit()
    expected, finished = spec.num_samples, finished_trials(spec)
    if finished < expected:
        log(f"interrupted with {finished} of {expected} trials finished")
        return None
    return results


# ----------------------------------------------------------------------------- 3. rank


def rank(spec: SweepSpec, record: Record, results, log: Log):
    """(the trial table, the configurations ranked: raven.sweep.selection.rank_configurations)."""
    run_ids = {}
    try:
        run_ids = record.tracker.queue.read("looking up the trials' MLflow runs for trials.csv",
                                            record.tracker.trial_runs, {})
    except Exception as exc:  # noqa: BLE001 - the table is written without the run ids
        log(f"warning: MLflow trial runs not read: {type(exc).__name__}: {exc}")
    table = sweep_report.trial_table(results, spec, run_ids)
    return table, rank_configurations(table, spec.param, spec.objective_list)


# ----------------------------------------------------------------------------- 4. evaluate the best


EVAL_HEARTBEAT_S = 300.0  # seconds between the evaluation stage's lines when no progress bar is shown


def _evaluate_task(checkpoint_bytes: bytes, splits: DataSplits, evaluation: dict[str, Any], label: str,
                   threads: int) -> dict[str, Any]:
    """Body of the Ray task: the full evaluation of one checkpoint; its files come back as bytes."""
    torch.set_num_threads(max(1, threads))
    device = resolve_device("auto")
    started, began_at = time.perf_counter(), time.time()  # began_at: the MLflow run's start time
    with tempfile.TemporaryDirectory(prefix="raven-eval-") as tmp:
        file = Path(tmp) / CHECKPOINT_NAME
        file.write_bytes(checkpoint_bytes)
        model = load_checkpoint(file, map_location=device)
        if splits.device != device:
            splits = splits.to(device)
        out = Path(tmp) / "evaluation"
        # Its stages (probe, attacks per budget with the time left, FID) reach the driver's console through Ray.
        result = evaluate_model(model, splits, EvalConfig(**evaluation), out_dir=out, label=label,
                                log=lambda line: print(f"raven sweep: [{label}] {line.strip()}", file=sys.stderr,
                                                       flush=True))
        paths = [*result.artifacts, plots.plot_accuracy_curves([(label, result.to_json())], out / CURVES_PNG,
                                                               title=f"{label}: test robustness")]
        artifacts = {p.name: p.read_bytes() for p in map(Path, paths) if p.is_file()}
    result.artifacts = []
    return {"result": result, "artifacts": artifacts, "device": str(device), "node": node_name(),
            "seconds": time.perf_counter() - started, "began_at": began_at}


def evaluate_best(spec: SweepSpec, record: Record, results, table, ranked, splits_ref, splits: DataSplits,
                  cluster: ClusterInfo, clock: SweepClock, data_dir: str | None, log: Log) -> list[dict[str, Any]]:
    """Evaluate every seed of the candidate configurations (raven.sweep.selection.candidates) as Ray tasks.

    Seeds with a recorded evaluation run are not evaluated again (their metrics are read back;
    while the store is down none is looked up); a seed that diverged is not evaluated. Each
    evaluation's folder (files, robustness.json, checkpoint) is written, then its MLflow record
    queued (raven.sweep.record). Returned in ranking order, seeds in order: the first is the best.
    """
    values = candidates(ranked, spec.evaluate_top, spec.objective_list)
    if not values:
        return []
    chosen = table[table[spec.param].isin(values) & (table["status"] == "TERMINATED")]
    by_id = {Path(r.path).name.removeprefix("trial_"): r for r in results}
    gpus = cluster.gpus_per(spec.eval_gpus, EVAL_GPU_SHARE)
    tracker = record.tracker
    done: list[dict[str, Any]] = []
    jobs: dict[tuple[str, int], tuple] = {}
    info: dict[tuple[str, int], dict[str, Any]] = {}
    for _, row in chosen.iterrows():
        trial_id, seed = row["trial_id"], int(row["seed"])
        item = {"trial_id": trial_id, "value": float(row[spec.param]), "seed": seed}
        name = f"trial {trial_id}" + (f" seed {seed}" if spec.seeds > 1 else "")
        found = tracker.queue.read("looking up evaluations recorded earlier",
                                   lambda: tracker.finished_evaluation(trial_id, seed), None)
        if found is not None:
            done.append({**item, "run_id": found["run_id"], "metrics": found["metrics"], "reused": True})
            log(f"evaluation of {name} already in MLflow run {found['run_id']}; not repeated")
            continue
        result = by_id.get(trial_id)
        if result is None or result.checkpoint is None:
            log(f"{name} has no checkpoint; not evaluated")
            continue
        with result.checkpoint.as_directory() as folder:
            checkpoint_bytes = (Path(folder) / member_dirname(seed) / CHECKPOINT_NAME).read_bytes()
        label = f"{spec.method} {trial_label(spec, result.config, trial_id, seed)}"
        jobs[trial_id, seed] = (checkpoint_bytes, splits_ref, spec.evaluation, label)
        info[trial_id, seed] = {**item, "name": name, "config": result.config, "checkpoint_bytes": checkpoint_bytes}
    cpus = cluster.eval_cpus(spec.eval_cpus, spec.cpus_per_trial, len(jobs))
    jobs = {key: (*job, max(1, int(cpus))) for key, job in jobs.items()}  # its torch threads: the CPUs it holds
    evaluation = spec.eval_config
    # The evaluation scaled from the objective's cost as the trials measured it (raven.sweep.clock),
    # per model: a trial's objective_seconds covers all its seeds.
    measured = table["objective_seconds"].dropna()
    objective_s = float(measured.mean()) / spec.seeds if len(measured) else clock.rates.objective_s / spec.seeds
    clock.rates = replace(clock.rates, evaluation_s=evaluation_estimate(spec, objective_s, gpus > 0, clock.rates))
    clock.evaluation_stage(len(jobs))
    inputs = dataset_inputs(spec.dataset, data_dir, {
        "train": len(splits.train_x[:evaluation.probe_limit]), "test": len(splits.test_x[:evaluation.limit])})
    progress = bar(len(jobs), "evaluation", "trial")
    for key in jobs:
        say(f"raven sweep: evaluating {info[key]['name']} ({jobs[key][3]}) as a Ray task (cpus {cpus:g}, "
            f"gpus {gpus:g}); {clock.text()}", progress)

    heartbeat = {"at": time.monotonic()}

    def tick() -> None:
        progress.set_postfix_str(clock.text())
        # Without a terminal there is no bar: a line every few minutes says the stage is alive and what is left.
        if progress.disable and time.monotonic() - heartbeat["at"] >= EVAL_HEARTBEAT_S:
            heartbeat["at"] = time.monotonic()
            say(f"raven sweep: evaluation: {clock.evaluations_done} of {len(jobs)} done; {clock.text()}")

    out_root = spec.experiment_dir.resolve() / "evaluations"
    for key, payload, error in run_tasks(_evaluate_task, jobs, cpus=cpus, gpus=gpus, tick=tick):
        if error is not None:
            raise error
        job = info[key]
        folder = out_root / key[0] / member_dirname(key[1]) if spec.seeds > 1 else out_root / key[0]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in payload["artifacts"].items():
            (folder / name).write_bytes(data)
        (folder / CHECKPOINT_NAME).write_bytes(job["checkpoint_bytes"])
        result: EvalResult = payload["result"]
        result.artifacts = [folder / name for name in payload["artifacts"]]
        trial_id, seed = key
        tracker.queue.submit({
            "op": "evaluation", "trial_id": trial_id, "seed": seed, "folder": str(folder),
            "artifacts": list(payload["artifacts"]),
            "run_name": f"eval {trial_label(spec, job['config'], trial_id, seed)}",
            "params": trial_params(spec, job["config"], seed), "inputs": inputs,
            "device": payload["device"], "node": payload["node"], "seconds": payload["seconds"],
            "began_at": payload["began_at"]})
        run_id = tracker.evaluation_runs.get(key, "")
        done.append({"trial_id": trial_id, "value": job["value"], "seed": seed, "run_id": run_id,
                     "metrics": result.metrics(), "result": result, "reused": False})
        clock.evaluation_finished(payload["seconds"])
        progress.update(1)
        say(f"raven sweep: evaluated {job['name']} on {payload['node']} ({payload['device']}) in "
            f"{payload['seconds']:.0f}s: clean {result.clean_accuracy:.4f}; "
            f"{f'MLflow run {run_id}' if run_id else 'its MLflow record queued'}"
            f"{'; ' + clock.text() if clock.evaluations_done < clock.evaluations else ''}", progress)
    progress.close()
    order = {v: i for i, v in enumerate(values)}
    return sorted(done, key=lambda e: (order[e["value"]], e["seed"]))


# ----------------------------------------------------------------------------- 5. close the record


def close_record(spec: SweepSpec, record: Record, table, ranked, evaluations: list[dict[str, Any]],
                 timing: dict[str, float] | None = None) -> None:
    """The sweep's files, then one queued write: them on the parent run, its summary metrics, the best model
    in the registry, the parent FINISHED (raven.sweep.record)."""
    out = spec.experiment_dir.resolve()
    table.to_csv(out / sweep_report.TRIALS_CSV, index=False)
    artifacts = [out / sweep_report.TRIALS_CSV, out / SPEC_NAME, *sweep_report.study_plots(record.study, spec, out)]
    artifacts += sweep_report.evaluation_outputs(spec, evaluations, out)
    front = sweep_report.pareto_table(ranked, spec) if len(spec.objective_list) > 1 else None
    pareto = None
    if front is not None:
        front.to_csv(out / sweep_report.PARETO_CSV, index=False)
        artifacts.append(out / sweep_report.PARETO_CSV)
        pareto = {"csv": str(out / sweep_report.PARETO_CSV), "artifact_file": sweep_report.PARETO_JSON}
    best = None
    if evaluations:
        best = {"trial_id": evaluations[0]["trial_id"], "seed": evaluations[0]["seed"],
                "name": tracking.registered_model_name(spec.dataset, spec.method)}
    metrics = {**sweep_report.summary_metrics(spec, table, ranked, evaluations), **(timing or {})}
    record.tracker.queue.submit({"op": "close", "metrics": metrics,
                                 "artifacts": [str(p) for p in artifacts], "table": pareto, "best": best})


# ----------------------------------------------------------------------------- the driver


def run(spec: SweepSpec, address: str | None, data_dir: str | None, resume: bool, log: Log | None = None) -> int:
    """Run (or, with resume, continue) the sweep: 0 when done, 1 when no trial finished, 75 when the work is
    done but MLflow writes are kept for --resume (the store stayed away), 130 when interrupted."""
    log = log or (lambda line: say(f"raven sweep: {line}"))
    started = time.perf_counter()
    command = resume_command(spec, address)
    tracker = SweepRecord(spec.tracking_uri, spec.experiment, spec.name,
                          pending_path=spec.experiment_dir.resolve() / tracking.PENDING_NAME, log=log)
    tracker.queue.load_pending()
    if resume and tracker.closing_queued():
        log(f"sweep {spec.name} had finished its work; replaying the {tracker.queue.pending} MLflow write(s) it kept")
        if not deliver(spec, tracker, spec.tracking_wait, command, log):
            return WRITES_KEPT
        log(f"the MLflow record of sweep {spec.name} is complete: {spec.tracking_uri}, experiment "
            f"{spec.experiment!r}, parent run {tracker.parent_id}")
        return 0
    try:
        splits = load_splits(spec.dataset, data_dir, "cpu", validation_size=spec.validation_size)
    except DataError as exc:
        raise SweepError(str(exc)) from None
    cluster = connect(address, log=log)
    try:
        record = open_record(spec, tracker, cluster, resume, log)
        log(f"Ray cluster {cluster.address}: {cluster.nodes} node(s), {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs")
        splits_ref = ray.put(splits)  # once; every trial and evaluation task reads this object
        clock = estimate(spec, splits, cluster, log)
        # The first estimate beside the wall times, on the parent run: how far the clock was from the truth.
        timing = {"estimate_seconds": clock.left(), "estimate_search_seconds": clock.search_left(),
                  "estimate_evaluation_seconds": clock.evaluation_left()}
        stage = time.perf_counter()
        results = search(spec, record, splits, splits_ref, cluster, clock, data_dir, resume, log)
        timing["search_seconds"], stage = time.perf_counter() - stage, time.perf_counter()
        if results is None:
            tracker.queue.submit({"op": "parent", "status": "KILLED"})
            if deliver(spec, tracker, 0.0, command, log):
                log(f"continue with: {command}")
            return 130
        table, ranked = rank(spec, record, results, log)
        try:
            evaluations = evaluate_best(spec, record, results, table, ranked, splits_ref, splits, cluster,
                                        clock, data_dir, log)
            timing["evaluation_seconds"] = time.perf_counter() - stage
        except BaseException:
            interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
            tracker.queue.submit({"op": "parent", "status": "KILLED" if interrupted else "FAILED"})
            raise
    finally:
        ray.shutdown()
    close_record(spec, record, table, ranked, evaluations, timing)
    trial_runs = tracker.queue.read("listing the trial runs", tracker.trial_runs, {})
    sweep_report.print_summary(spec, table, ranked, evaluations, tracker.experiment_id, record.parent_id,
                               time.perf_counter() - started, sorted(trial_runs.values()))
    if ranked.empty:
        log("no trial finished with an objective value (see the errors above and in trials.csv)")
    if not deliver(spec, tracker, spec.tracking_wait, command, log):
        return WRITES_KEPT
    return 1 if ranked.empty else 0


# ----------------------------------------------------------------------------- command line


class SweepArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`PROG: error: ...`, exit status 2) and no usage dump."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(parser: argparse.ArgumentParser, argv: Sequence[str] | None, kind: str,
         search_space: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Parse, build (or, with --resume, load) the spec, run the sweep; user errors in one line, exit 2.

    `search_space(args)` returns the entry script's choices: method, space (a raven.sweep.space.SearchSpace)
    and optionally train_extra (SweepSpec fields); it raises ConfigError for a bad range.
    """
    args = parser.parse_args(argv)
    try:
        check_address(args.address)
        if args.resume:
            spec = find_resumable(args.storage_path or SweepSpec.__dataclass_fields__["storage_path"].default,
                                  kind, args.name)
            if args.tracking_wait is not None:  # the one setting a resumed sweep takes anew
                spec = replace(spec, tracking_wait=args.tracking_wait)
        else:
            spec = spec_from_args(args, kind=kind, **search_space(args))
        return run(spec, args.address, args.data_dir, resume=args.resume)
    except (SweepError, ConfigError, ClusterError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; continue with --resume", file=sys.stderr)
        return 130
