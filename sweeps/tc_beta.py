#!/usr/bin/env python
"""Sweep beta-TCVAE's tc_beta (the weight of the total correlation) on Ray Tune with Optuna; record it in MLflow.

Selection objective: val_robust_accuracy on the validation split (raven.sweep.selection). After the
search the best configuration(s) get the full test-set robustness evaluation (raven.sweep.driver).

    python sweeps/tc_beta.py --smoke                    # local Ray, about two minutes on 2 CPU cores
    python sweeps/tc_beta.py --address auto             # join a running cluster (`ray start --head`)
    python sweeps/tc_beta.py --resume                   # continue the latest interrupted tc_beta sweep
"""

from __future__ import annotations

import sys
from dataclasses import replace

from raven.sweep import driver as sweep
from raven.sweep.space import SearchSpace
from raven.sweep.spec import add_arguments


def build_parser() -> sweep.SweepArgumentParser:
    parser = sweep.SweepArgumentParser(
        prog="tc_beta.py", description=__doc__.splitlines()[0],
        epilog="Search space: tc_beta log-uniform in [--tc-beta-min, --tc-beta-max] (default 1..20; 1 is the VAE), "
               "tc_beta = 1 and the range's geometric middle first. The RAVEN paper has no value for it.")
    add_arguments(parser, experiment="raven-tc-beta")
    g = parser.add_argument_group("search space")
    g.add_argument("--tc-beta-min", type=float, default=1.0, help="lower end of the log-uniform range (default 1)")
    g.add_argument("--tc-beta-max", type=float, default=20.0, help="upper end (default 20)")
    g.add_argument("--initial", choices=("vae", "none"), default="vae",
                   help="evaluated before Optuna's proposals: tc_beta = 1 (the VAE) and the range's geometric "
                        "middle, those inside the range (default), or nothing")
    return parser


def search_space(args) -> dict:
    space = SearchSpace.log_uniform("tc_beta", args.tc_beta_min, args.tc_beta_max)
    if args.initial == "vae":
        space = replace(space, initial=(1.0, space.middle))
    return {"method": "beta-tcvae", "space": space}


def main(argv: list[str] | None = None) -> int:
    return sweep.main(build_parser(), argv, "tc_beta", search_space)


if __name__ == "__main__":
    sys.exit(main())
