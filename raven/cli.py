"""The `raven` command: `raven train`, and the subcommands registered below it.

User mistakes end in one line on stderr (`raven: error: ...`) and exit status 2, before
any data is read or any model is built. Each subcommand imports what it needs when it runs
(torch, MLflow, matplotlib take seconds to import), so `raven --help` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from raven.config import METHODS, ConfigError, TrainConfig
from raven.eval.evaluate import EvalConfig
from raven.methods import options
from raven.options import add_field_flags, field_flag_values


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every method's option (raven.methods), its help, type and default from the option."""
    group = parser.add_argument_group("method options (each method reads its own)")
    for option in options().values():
        kind = option.parse or (float if option.default is None else type(option.default))
        default = "" if option.default is None else f" (default {option.default:g})" if isinstance(
            option.default, float) else f" (default {option.default})"
        group.add_argument(option.flag, type=kind, default=None, choices=option.choices,
                           help=option.help + default)


def option_values(args: argparse.Namespace) -> dict[str, object]:
    """The method options given on the command line (the others keep TrainConfig's defaults)."""
    return {name: getattr(args, name) for name in options() if getattr(args, name, None) is not None}


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train one model and write its checkpoint and metrics.json")
    p.add_argument("--method", required=True, choices=METHODS)
    add_field_flags(p, TrainConfig)  # the shared fields; the methods' options below
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/METHOD-DATASET-sSEED); an existing checkpoint there is resumed")
    p.add_argument("--seeds", default=None, metavar="SEEDS",
                   help="train these seeds as one packed model (0-4 or 0,2,5) into OUT/seed-N "
                        "(default OUT runs/METHOD-DATASET); replaces --seed")
    p.add_argument("--data-dir", default=None, help="data root (default: $RAVEN_DATA_DIR, else ~/.cache/raven/data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out and start over")
    add_option_flags(p)
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from raven.train import resolve_device, train

    config = TrainConfig(method=args.method, **field_flag_values(args, TrainConfig), **option_values(args))
    device = resolve_device(args.device)
    if args.seeds is not None:
        return _run_train_seeds(args, config, device)
    out = args.out or Path("runs") / f"{config.method}-{config.dataset}-s{config.seed}"
    print(f"raven train: {config.method} on {config.dataset}, {config.epochs} epochs, device {device}, out {out}",
          file=sys.stderr)
    started = time.perf_counter()
    result = train(config, device=device, out_dir=out, resume=not args.fresh, data_dir=args.data_dir,
                   log=lambda line: print(line, file=sys.stderr))
    final = result.final_metrics
    print(f"done in {time.perf_counter() - started:.1f}s: val_elbo {final['val_elbo']:.2f} nats, "
          f"val_mse_255 {final['val_mse_255']:.1f}; wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")
    return 0


def _run_train_seeds(args: argparse.Namespace, config: TrainConfig, device: object) -> int:
    from raven.pack import member_dirname, parse_seeds, train_pack

    seeds = parse_seeds(args.seeds)
    out = args.out or Path("runs") / f"{config.method}-{config.dataset}"
    dirs = [out / member_dirname(seed) for seed in seeds]
    print(f"raven train: {config.method} on {config.dataset}, seeds {args.seeds} as one pack, {config.epochs} "
          f"epochs, device {device}, out {out}/seed-N", file=sys.stderr)
    started = time.perf_counter()
    results = train_pack([config.replace(seed=seed) for seed in seeds], device=device, out_dirs=dirs,
                         resume=not args.fresh, data_dir=args.data_dir, log=lambda line: print(line, file=sys.stderr))
    for folder, result in zip(dirs, results):
        if result.diverged:
            print(f"{folder}: training diverged: {result.diverged}", file=sys.stderr)
        else:
            print(f"{folder}: val_elbo {result.final_metrics['val_elbo']:.2f} nats, "
                  f"val_mse_255 {result.final_metrics['val_mse_255']:.1f}")
    print(f"done in {time.perf_counter() - started:.1f}s: wrote checkpoint.pt and metrics.json in each of "
          f"{len(dirs)} folders under {out}")
    return 1 if any(result.diverged for result in results) else 0


# `raven evaluate` runs both protocols unless told; EvalConfig's own default is the paper's alone.
EVALUATE_DEFAULTS = {"protocol": "both"}


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="robustness of trained checkpoints: linear probe, PGD attacks, MSE, FID, plots",
        description="Fit a linear probe on encoder means, attack every test image with PGD per attack and "
                    "budget, and write robustness.json, robustness.csv and plots next to each checkpoint.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint folders (or checkpoint.pt files) of `raven train`")
    add_field_flags(p.add_argument_group("evaluation (raven.eval.evaluate.EvalConfig)"), EvalConfig,
                    shown=EVALUATE_DEFAULTS)
    p.add_argument("--plots-dir", type=Path, default=None,
                   help="folder for the combined accuracy-vs-delta plot (default: the first DIR's parent)")
    p.add_argument("--data-dir", default=None, help="data root (default: $RAVEN_DATA_DIR, else ~/.cache/raven/data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--tracking-uri", default=None, help="log to MLflow at this tracking URI (one run per DIR)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default raven-evaluate); turns logging on")
    p.set_defaults(run=run_evaluate)


def _run_labels(configs: list[TrainConfig]) -> list[str]:
    """The method, plus every setting (except the seed) that differs between the given runs."""
    varying = [f for f in TrainConfig.__dataclass_fields__
               if f not in ("method", "seed") and len({repr(getattr(c, f)) for c in configs}) > 1]
    labels = []
    for c in configs:
        extras = [f"{f}={getattr(c, f)}" for f in varying]
        labels.append(c.method + (f" ({', '.join(extras)})" if extras else ""))
    return labels


def run_evaluate(args: argparse.Namespace) -> int:
    from raven.data import load_splits
    from raven.eval.evaluate import CURVES_PNG, evaluate_checkpoint, format_summary
    from raven.eval.plots import plot_accuracy_curves
    from raven.record.provenance import dataset_inputs
    from raven.train import checkpoint_file, load_state, resolve_device

    config = EvalConfig(**{**EVALUATE_DEFAULTS, **field_flag_values(args, EvalConfig)})
    files = [checkpoint_file(d) for d in args.dirs]  # every checkpoint must exist before any work
    device = resolve_device(args.device)
    configs = [TrainConfig.from_dict(load_state(f)["config"]) for f in files]
    labels = _run_labels(configs)
    plots_dir = args.plots_dir or files[0].resolve().parent.parent
    print(f"raven evaluate: {len(files)} checkpoint(s), attacks {','.join(config.attacks)}, "
          f"deltas {','.join(f'{d:g}' for d in config.deltas)}, {config.steps} steps, device {device}", file=sys.stderr)
    started = time.perf_counter()
    results, splits_cache = [], {}
    with _evaluation_record(args, len(files)) as record:
        for file, train_config, label in zip(files, configs, labels):
            key = (train_config.dataset, train_config.validation_size)
            if key not in splits_cache:
                splits_cache[key] = load_splits(train_config.dataset, args.data_dir, device, train_config.validation_size)
            splits = splits_cache[key]
            result = evaluate_checkpoint(file, config, device=device, label=label, splits=splits,
                                         log=lambda line: print(line, file=sys.stderr, flush=True))
            results.append(result)
            if record is not None:
                record.log(result, file, label, dataset_inputs(
                    train_config.dataset, args.data_dir, {"train": len(splits.train_x[:config.probe_limit]),
                                                          "test": len(splits.test_x[:config.limit])},
                    train_config.validation_size))
        curves = plot_accuracy_curves([(r.label, r.to_json()) for r in results], Path(plots_dir) / CURVES_PNG,
                                      attacks=config.attacks, title="linear-probe accuracy under PGD attacks")
        if record is not None:
            record.log_curves(curves)
    print(format_summary(results))
    written = ", ".join(str(f.parent / "robustness.json") for f in files)
    print(f"done in {time.perf_counter() - started:.1f}s: wrote {written}; combined plot {curves}")
    return 0


def _evaluation_record(args: argparse.Namespace, checkpoints: int) -> Any:
    """raven.record.tracking.EvaluationRecord when MLflow is asked for (a flag, MLFLOW_RUN_ID, an active run)."""
    import contextlib
    import os

    asked = args.tracking_uri or args.experiment or os.environ.get("MLFLOW_RUN_ID") or (
        "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None)
    if not asked:
        return contextlib.nullcontext()
    from raven.record.tracking import EvaluationRecord

    return EvaluationRecord(args.tracking_uri, args.experiment, checkpoints)


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="the paper's Tables 1-2 and Figures 1-2 from a reproduction recorded in MLflow",
        description="Read a reproduction (python sweeps/reproduce.py) from MLflow and write report.md, the tables "
                    "as CSV and the figures as PNG, each next to the paper's published numbers.")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder)")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment of the reproduction (default raven-reproduction)")
    p.add_argument("--run-id", default=None, help="the reproduction's parent run (default: the latest)")
    p.add_argument("--parts", type=Path, nargs="+", default=None, metavar="FOLDER",
                   help="read a reproduction run in parts (python sweeps/reproduce.py --parts) from these folders, "
                        "merged, instead of MLflow")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default report/)")
    p.add_argument("--data-dir", default=None,
                   help="data root, only to recompute a t-SNE missing from the runs (default: $RAVEN_DATA_DIR)")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from raven.record.tracking import REPRODUCTION_EXPERIMENT
    from raven.reproduce.report import ReportError, write_report

    try:
        path = write_report(args.out, args.tracking_uri, args.experiment or REPRODUCTION_EXPERIMENT, args.run_id,
                            args.data_dir, parts=args.parts)
    except ReportError as exc:
        print(f"raven: error: {exc}", file=sys.stderr)
        return 2
    print(next(line for line in path.read_text().splitlines() if line.startswith("**Budget")))
    print(f"wrote {path} and its tables and figures in {path.parent}")
    return 0


def add_sweep_report_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep-report", help="what sweeps found (python sweeps/sigma_aug.py, ...), read from their MLflow record",
        description="Read one or more sweeps of one parameter from MLflow (by default the latest sweep of each "
                    "objective) and write report.md, the trial and evaluation tables as CSV, the landscape of each "
                    "objective against the searched value and the Pareto front of clean against robust accuracy.")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder)")
    p.add_argument("--experiment", default="raven-sigma-aug",
                   help="MLflow experiment of the sweeps (default raven-sigma-aug; raven-se-eta, raven-tc-beta)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="NAME",
                   help="the sweeps by name (default: the latest sweep of each objective on --dataset)")
    p.add_argument("--dataset", default=None, help="the data set of the sweeps (default: the latest sweep's)")
    p.add_argument("--from-report", nargs="+", default=[], metavar="DIR",
                   help="also read the sweeps of earlier report folders (their sweeps.json, trials.csv and "
                        "evaluations.csv) that the store lacks, e.g. a sweep whose store is on another machine")
    p.add_argument("--out", type=Path, default=Path("sweep-report"), help="output folder (default sweep-report/)")
    p.set_defaults(run=run_sweep_report)


def run_sweep_report(args: argparse.Namespace) -> int:
    from raven.reproduce.sweep_report import SweepReportError, load_report_sweeps, load_sweeps, merge_sweeps, \
        write_sweep_report

    earlier = [sweep for folder in args.from_report for sweep in load_report_sweeps(folder)]
    try:
        stored = load_sweeps(args.tracking_uri, args.experiment, args.sweep, args.dataset)
    except SweepReportError:
        if not earlier:
            raise
        stored = []  # the earlier reports alone
    sweeps = merge_sweeps(stored, earlier)
    path = write_sweep_report(args.out, sweeps)
    for sweep in sweeps:
        print(f"{sweep.name}: {len(sweep.trials)} trials, objective {sweep.objective}, best {sweep.param} = "
              f"{sweep.best_value:.4g}, {len(sweep.evaluations)} test evaluation(s)"
              + (f" (from the report {sweep.source})" if sweep.source else ""))
    print(f"wrote {path} and its tables and figures in {path.parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raven", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_report_parser(subparsers)
    add_sweep_report_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from raven.data import DataError
    from raven.train import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"raven: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"raven: training diverged: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raven: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
