"""Reproduce the paper's experiment: 5 methods x 2 datasets x 5 seeds on Ray, recorded in MLflow.

Each (dataset, method) is one Ray task that trains its seeds as one pack (raven.pack), then evaluates each.

    python sweeps/reproduce.py --smoke              # a few minutes on a laptop CPU, every table and figure
    python sweeps/reproduce.py --address auto --gpus-per-task 0.25   # the full budget on a Ray cluster
    raven report                                    # tables and figures of the latest reproduction

sigma_aug and eta are the best values recorded by sweeps/sigma_aug.py and sweeps/se_eta.py
in the same tracking store (the paper's with --paper-values; raven's documented defaults, with
a warning, when none is found). The machinery is raven.reproduce.runner (on Ray), raven.reproduce.grid (the budget and the
cells) and raven.reproduce.offline (--export, on a machine without Ray or MLflow).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raven.config import PAPER_ETA, PAPER_SIGMA_AUG, ConfigError
from raven.options import add_field_flags, field_flag_values
from raven.reproduce import offline as reproduce_offline
from raven.reproduce.grid import FULL_BUDGET, SMOKE_BUDGET, Budget


def _per_dataset(values: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {dataset}" for dataset, value in values.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = p.add_argument_group("budget (raven.reproduce.grid.Budget; defaults: the full reproduction; --smoke: "
                                  "the smoke budget; any flag overrides either)")
    add_field_flags(budget, Budget, label="full:")
    p.add_argument("--paper-values", action="store_true",
                   help=f"use the paper's sigma_aug ({_per_dataset(PAPER_SIGMA_AUG)}) and eta ({_per_dataset(PAPER_ETA)}), "
                        "not the sweeps'")
    # Experiment defaults (None) are raven.record.tracking's names, resolved once MLflow is imported.
    p.add_argument("--sigma-aug-experiment", default=None,
                   help="MLflow experiment of the sigma_aug sweeps (default raven-sigma-aug)")
    p.add_argument("--eta-experiment", default=None, help="MLflow experiment of the eta sweeps (default raven-se-eta)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: 'auto' (RAY_ADDRESS, else a cluster started on this machine) or "
                        "HOST:PORT; absent: start a local Ray with this machine's resources")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per (dataset, method) task, which trains its seeds as one pack "
                        "(default 1)")
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="GPUs per task; fractions share one GPU between tasks (default 0.25 on a cluster with GPUs, "
                        "else 0)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI, also where the sweeps are looked up (default: MLFLOW_TRACKING_URI, "
                        "else sqlite:///mlflow.db in this folder, artifacts in ./mlruns)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default raven-reproduction)")
    p.add_argument("--resume", action="store_true",
                   help="reopen the latest reproduction (or --run-id) and skip the runs it already holds")
    p.add_argument("--run-id", default=None, help="with --resume: the reproduction parent run to continue")
    p.add_argument("--data-dir", default=None, help="data root on every node (default: $RAVEN_DATA_DIR there)")
    p.add_argument("--work-dir", default="runs/reproduce",
                   help="checkpoint folder on each node (default runs/reproduce)")
    parts = p.add_argument_group("a long run on one machine, in parts (raven.reproduce.parts)")
    parts.add_argument("--parts", type=Path, default=None,
                       help="run the (dataset, method) packs one after another in this process and write each, when it "
                            "finishes, as PARTS/<dataset>-<method>/part.json (numbers only; checkpoints stay in "
                            "--work-dir); parts already there are not rerun; no Ray; report with raven report --parts")
    parts.add_argument("--threads", type=int, default=None, help="with --parts: torch threads (default torch's)")
    offline = p.add_argument_group("machines without Ray or MLflow (e.g. a lent GPU box)")
    offline.add_argument("--export", type=Path, default=None,
                         help="run every (dataset, method) pack in a local process pool and write the results to this file "
                              "(no Ray, no MLflow; the paper's sigma_aug and eta); record it later with --import")
    offline.add_argument("--workers", type=int, default=4, help="with --export: processes sharing the device")
    offline.add_argument("--device", default="auto", help="with --export: device of every process (auto, cuda, cpu)")
    offline.add_argument("--import", dest="import_path", type=Path, default=None,
                         help="record a file written by --export in MLflow as a reproduction, then exit")
    offline.add_argument("--note", default="", help="with --import: a note stored as the parent's raven.note tag")
    return p.parse_args(argv)


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The full budget (the smoke one with --smoke), changed by the budget flags given."""
    changes = field_flag_values(args, Budget)
    return (SMOKE_BUDGET if changes.pop("smoke", False) else FULL_BUDGET).replace(**changes)


def run_parts(args: argparse.Namespace, budget: Budget) -> int:
    """--parts: hyperparameters as a Ray reproduction chooses them (the sweeps in the tracking store), then the parts."""
    from raven.record import tracking
    from raven.reproduce.parts import run_parts as run
    from raven.reproduce.runner import select_hyperparameters

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    tracking.use_store(args.tracking_uri)
    hps = select_hyperparameters(budget.datasets, args.paper_values, allow_smoke=not budget.full, log=log,
                                 sigma_experiment=args.sigma_aug_experiment or tracking.SIGMA_SWEEP_EXPERIMENT,
                                 eta_experiment=args.eta_experiment or tracking.ETA_SWEEP_EXPERIMENT)
    for hp in hps.values():
        log(f"{hp.dataset}: sigma_aug = {hp.sigma_aug:g}, eta = {hp.eta:g} ({hp.source})")
    written, present, failed = run(budget, hps, args.parts, args.work_dir, args.data_dir, threads=args.threads,
                                   log=log)
    print(f"{len(written)} parts written, {len(present)} already there, {len(failed)} with a failed seed; "
          f"next: raven report --parts {args.parts}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        budget = budget_from_args(args)
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        if args.parts is not None:
            return run_parts(args, budget)
        if args.export is not None:
            reproduce_offline.export(budget, args.workers, args.data_dir, args.work_dir, args.device, args.export,
                                     log=lambda line: print(line, file=sys.stderr, flush=True))
            print(f"wrote {args.export}; record it with: python sweeps/reproduce.py --import {args.export}")
            return 0
        # Ray and MLflow are needed from here on only: --export runs on machines without them.
        from raven.record import tracking
        from raven.reproduce import runner as reproduce
        from raven.sweep.cluster import ClusterError

        experiment = args.experiment or tracking.REPRODUCTION_EXPERIMENT

        if args.import_path is not None:
            if not args.import_path.is_file():
                raise ConfigError(f"no export file at {args.import_path}")
            run_id = reproduce.import_results(args.import_path, args.tracking_uri, experiment, args.note)
            print(f"reproduction run {run_id}; next: raven report --run-id {run_id}")
            return 0
        try:
            summary = reproduce.reproduce(
                budget, paper_values=args.paper_values, tracking_uri=args.tracking_uri, experiment=experiment,
                address=args.address, cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task,
                resume=args.resume, run_id=args.run_id, data_dir=args.data_dir, work_dir=args.work_dir,
                sigma_experiment=args.sigma_aug_experiment or tracking.SIGMA_SWEEP_EXPERIMENT,
                eta_experiment=args.eta_experiment or tracking.ETA_SWEEP_EXPERIMENT)
        except ClusterError as exc:
            raise ConfigError(str(exc)) from None
    except ConfigError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reproduce: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    print(f"reproduction run {summary.run_id} ({summary.budget.describe()}); next: raven report"
          + (f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
