#!/usr/bin/env python
"""Sweep the Smooth Encoder's coupling eta on Ray Tune with Optuna; record it in MLflow.

Selection objective: val_robust_accuracy on the validation split (raven.sweep.selection). After the
search the best configuration(s) get the full test-set robustness evaluation (raven.sweep.driver).

    python sweeps/se_eta.py --smoke                     # local Ray, about two minutes on 2 CPU cores
    python sweeps/se_eta.py --address auto --eta-grid   # on a cluster, over the paper's grid
    python sweeps/se_eta.py --resume                    # continue the latest interrupted eta sweep
"""

from __future__ import annotations

import argparse
import math
import sys

from raven.config import PAPER_ETA, PAPER_SE_ETA_GRID, ConfigError
from raven.methods.smooth_encoder import SE_EPSILON, SE_STEPS
from raven.record.tracking import ETA_SWEEP_EXPERIMENT
from raven.sweep import driver as sweep
from raven.sweep.space import INITIAL_CHOICES, PaperValues, SearchSpace
from raven.sweep.spec import add_arguments

PAPER = PaperValues(selected=PAPER_ETA, grid=PAPER_SE_ETA_GRID)  # Appendix C.2


def build_parser() -> sweep.SweepArgumentParser:
    parser = sweep.SweepArgumentParser(
        prog="se_eta.py", description=__doc__.splitlines()[0],
        epilog="Search space: eta log-uniform in [--eta-min, --eta-max] (default 0.1..1e4: the paper's grid and "
               "below, where the optimum under raven's Bernoulli likelihood lies), or with --eta-grid the paper's "
               "grid 50,100,250,500,1000,2500,5000,10000 (Appendix C.2), or with --eta-values a grid of your own, "
               "as a categorical; the paper's selected eta (500 MNIST, 5000 Fashion-MNIST) first. "
               "--eta-values V1,...,Vn --num-samples n evaluates each value once, in order: a grid search.")
    add_arguments(parser, experiment=ETA_SWEEP_EXPERIMENT)
    g = parser.add_argument_group("search space")
    g.add_argument("--eta-min", type=float, default=0.1, help="lower end of the log-uniform range (default 0.1)")
    g.add_argument("--eta-max", type=float, default=1e4, help="upper end (default 1e4)")
    g.add_argument("--eta-grid", action="store_true", help="search the paper's eta grid instead of a range")
    g.add_argument("--eta-values", type=_values, default=None,
                   help="comma-separated eta values to search instead of a range, all evaluated first in the "
                        "order given (README: 0.1,0.3,1,3,10,30,50,100,250,500,1000,2500,5000,10000)")
    g.add_argument("--initial", choices=INITIAL_CHOICES, default="paper",
                   help="evaluated before Optuna's proposals: the paper's selected eta (default), its whole grid, "
                        "or nothing")
    g.add_argument("--se-epsilon", type=float, default=SE_EPSILON.default,
                   help=f"training L-inf radius of the partner (default {SE_EPSILON.default:g})")
    g.add_argument("--se-steps", type=int, default=SE_STEPS.default,
                   help=f"PGD steps for the partner (default {SE_STEPS.default})")
    return parser


def _values(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct finite numbers > 0, got {text!r}")
    return values


def search_space(args) -> dict:
    if args.eta_values and args.eta_grid:
        raise ConfigError("--eta-values and --eta-grid name two grids; give one")
    dataset = args.dataset or "mnist"
    initial, paper = PAPER.pick(args.initial, dataset), PAPER.selected[dataset]
    if args.eta_values:
        space = SearchSpace.grid("eta", args.eta_values, initial=args.eta_values, paper=paper)
    elif args.eta_grid:
        space = SearchSpace.grid("eta", PAPER.grid, initial=initial, paper=paper)
    elif 0 < args.eta_min < args.eta_max:
        space = SearchSpace.log_uniform("eta", args.eta_min, args.eta_max, initial=initial, paper=paper)
    else:
        raise ConfigError(f"the eta range must satisfy 0 < --eta-min < --eta-max, got [{args.eta_min:g}, "
                          f"{args.eta_max:g}]")
    return {"method": "se", "space": space, "train_extra": {"se_epsilon": args.se_epsilon, "se_steps": args.se_steps}}


def main(argv: list[str] | None = None) -> int:
    return sweep.main(build_parser(), argv, "se_eta", search_space)


if __name__ == "__main__":
    sys.exit(main())
