#!/usr/bin/env python
"""Sweep RAVEN's sigma_aug (the std of a(z|z~), Definition 1) on Ray Tune with Optuna; record it in MLflow.

Selection objective: val_robust_accuracy on the validation split (raven.sweep). After the
search the best configuration(s) get the full test-set robustness evaluation.

    python sweeps/sigma_aug.py --smoke                  # local Ray, about two minutes on 2 CPU cores
    python sweeps/sigma_aug.py --address auto           # join a running cluster (`ray start --head`)
    python sweeps/sigma_aug.py --resume                 # continue the latest interrupted sigma_aug sweep
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


def build_parser() -> sweep.SweepArgumentParser:
    parser = sweep.SweepArgumentParser(
        prog="sigma_aug.py", description=__doc__.splitlines()[0],
        epilog="Search space: sigma_aug log-uniform in [--sigma-min, --sigma-max] (default 1e-3..1, which covers "
               "the paper's grid 0.01..1 of Appendix C.2 and below), the paper's selected value "
               "(0.01 MNIST, 0.04 Fashion-MNIST) first.")
    sweep.add_common_arguments(parser, experiment="raven-sigma-aug")
    g = parser.add_argument_group("search space")
    g.add_argument("--method", choices=("raven", "raven-gmm"), default="raven", help="default raven")
    g.add_argument("--sigma-min", type=float, default=1e-3, help="lower end of the log-uniform range (default 1e-3)")
    g.add_argument("--sigma-max", type=float, default=1.0, help="upper end (default 1)")
    g.add_argument("--initial", choices=("paper", "paper-grid", "none"), default="paper",
                   help="evaluated before Optuna's proposals: the paper's selected sigma (default), its whole grid "
                        "0.01,0.02,0.04,0.1,0.2,0.4,1 (inside the range), or nothing")
    return parser


def make_spec(args) -> sweep.SweepSpec:
    initial = [v for v in sweep.paper_values("sigma_aug", args.dataset, args.initial)
               if args.sigma_min <= v <= args.sigma_max]
    space = {"type": "loguniform", "low": args.sigma_min, "high": args.sigma_max}
    return sweep.common_spec(args, "sigma_aug", args.method, "sigma_aug", space, initial)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 < args.sigma_min < args.sigma_max) or args.sigma_max > 1e3:
        parser.error(f"the sigma_aug range must satisfy 0 < --sigma-min < --sigma-max <= 1000, "
                     f"got [{args.sigma_min:g}, {args.sigma_max:g}]")
    return sweep.main(parser, argv, "sigma_aug", make_spec)


if __name__ == "__main__":
    sys.exit(main())
