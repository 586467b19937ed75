#!/usr/bin/env python
"""Sweep the Smooth Encoder's coupling eta on Ray Tune with Optuna; record it in MLflow.

Selection objective: val_robust_accuracy on the validation split (raven.sweep). After the
search the best configuration(s) get the full test-set robustness evaluation.

    python sweeps/se_eta.py --smoke                     # local Ray, about two minutes on 2 CPU cores
    python sweeps/se_eta.py --address auto --eta-grid   # on a cluster, over the paper's grid
    python sweeps/se_eta.py --resume                    # continue the latest interrupted eta sweep
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("raven") is None:
    # A checkout without `pip install -e .`: use it here and in the workers of a local Ray.
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

from raven import sweep  # noqa: E402
from raven.config import PAPER_SE_ETA_GRID  # noqa: E402


def build_parser() -> sweep.SweepArgumentParser:
    parser = sweep.SweepArgumentParser(
        prog="se_eta.py", description=__doc__.splitlines()[0],
        epilog="Search space: eta log-uniform in [--eta-min, --eta-max] (default 10..1e4), or with --eta-grid "
               "the paper's grid 50,100,250,500,1000,2500,5000,10000 (Appendix C.2) as a categorical; the "
               "paper's selected eta (500 MNIST, 5000 Fashion-MNIST) first.")
    sweep.add_common_arguments(parser, experiment="raven-se-eta")
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


def make_spec(args) -> sweep.SweepSpec:
    if args.eta_grid:
        space = {"type": "choice", "values": list(PAPER_SE_ETA_GRID)}
        inside = lambda v: v in PAPER_SE_ETA_GRID  # noqa: E731
    else:
        space = {"type": "loguniform", "low": args.eta_min, "high": args.eta_max}
        inside = lambda v: args.eta_min <= v <= args.eta_max  # noqa: E731
    initial = [v for v in sweep.paper_values("se_eta", args.dataset, args.initial) if inside(v)]
    return sweep.common_spec(args, "se_eta", "se", "eta", space, initial,
                             train_extra={"se_epsilon": args.se_epsilon, "se_steps": args.se_steps})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.eta_grid and not (0 < args.eta_min < args.eta_max):
        parser.error(f"the eta range must satisfy 0 < --eta-min < --eta-max, got [{args.eta_min:g}, {args.eta_max:g}]")
    if not (0 < args.se_epsilon <= 1) or args.se_steps < 1:
        parser.error("--se-epsilon must be in (0, 1] and --se-steps >= 1")
    return sweep.main(parser, argv, "se_eta", make_spec)


if __name__ == "__main__":
    sys.exit(main())
