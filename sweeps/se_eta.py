#!/usr/bin/env python
"""Sweep the Smooth Encoder's coupling eta on Ray Tune with Optuna; record it in MLflow.

Selection objective: val_robust_accuracy on the validation split (raven.selection). After the
search the best configuration(s) get the full test-set robustness evaluation (raven.sweep).

    python sweeps/se_eta.py --smoke                     # local Ray, about two minutes on 2 CPU cores
    python sweeps/se_eta.py --address auto --eta-grid   # on a cluster, over the paper's grid
    python sweeps/se_eta.py --resume                    # continue the latest interrupted eta sweep
"""

from __future__ import annotations

import sys

from raven import sweep
from raven.config import PAPER_SE_ETA_GRID, ConfigError
from raven.sweep_spec import add_arguments, paper_values
from raven.tracking import ETA_SWEEP_EXPERIMENT


def build_parser() -> sweep.SweepArgumentParser:
    parser = sweep.SweepArgumentParser(
        prog="se_eta.py", description=__doc__.splitlines()[0],
        epilog="Search space: eta log-uniform in [--eta-min, --eta-max] (default 10..1e4), or with --eta-grid "
               "the paper's grid 50,100,250,500,1000,2500,5000,10000 (Appendix C.2) as a categorical; the "
               "paper's selected eta (500 MNIST, 5000 Fashion-MNIST) first.")
    add_arguments(parser, experiment=ETA_SWEEP_EXPERIMENT)
    g = parser.add_argument_group("search space")
    g.add_argument("--eta-min", type=float, default=10.0, help="lower end of the log-uniform range (default 10)")
    g.add_argument("--eta-max", type=float, default=1e4, help="upper end (default 1e4)")
    g.add_argument("--eta-grid", action="store_true", help="search the paper's eta grid instead of a range")
    g.add_argument("--initial", choices=("paper", "paper-grid", "none"), default="paper",
                   help="evaluated before Optuna's proposals: the paper's selected eta (default), its whole grid, "
                        "or nothing")
    g.add_argument("--se-epsilon", type=float, default=0.1, help="training L-inf radius of the partner (default 0.1)")
    g.add_argument("--se-steps", type=int, default=5, help="PGD steps for the partner (default 5)")
    return parser


def search_space(args) -> dict:
    if args.eta_grid:
        space = {"type": "choice", "values": list(PAPER_SE_ETA_GRID)}
    elif 0 < args.eta_min < args.eta_max:
        space = {"type": "loguniform", "low": args.eta_min, "high": args.eta_max}
    else:
        raise ConfigError(f"the eta range must satisfy 0 < --eta-min < --eta-max, got [{args.eta_min:g}, "
                          f"{args.eta_max:g}]")
    inside = (lambda v: v in PAPER_SE_ETA_GRID) if args.eta_grid else (lambda v: args.eta_min <= v <= args.eta_max)
    return {"method": "se", "param": "eta", "space": space,
            "initial": [v for v in paper_values("se_eta", args.dataset or "mnist", args.initial) if inside(v)],
            "train_extra": {"se_epsilon": args.se_epsilon, "se_steps": args.se_steps}}


def main(argv: list[str] | None = None) -> int:
    return sweep.main(build_parser(), argv, "se_eta", search_space)


if __name__ == "__main__":
    sys.exit(main())
