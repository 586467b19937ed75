#!/usr/bin/env python
"""Measure what Ray Tune adds per trial: N small trials through sweeps/sigma_aug.py against the same trainings in a loop.

    python sweeps/ray_overhead.py                      # 8 trials of 1 epoch on 500 images, a local Ray
    python sweeps/ray_overhead.py --address HOST:PORT  # on a running cluster (token from RAY_AUTH_TOKEN[_PATH])

1. In-process: the data is loaded once, then each trial's training (`raven.train.train`) and
   its validation objective run one after the other in this process.
2. Through Ray: `sweeps/sigma_aug.py` runs twice, with 1 and with 1 + N trials, one trial at a
   time (`--max-concurrent 1`), no final evaluation, the same budget, a fresh Tune folder and
   SQLite store each. The difference of the two wall times over N is what one more trial costs
   through Ray; minus the in-process time of a trial, it is Ray's per-trial overhead (actor
   start, data from the object store, checkpoint upload, result and MLflow bookkeeping). The
   wall time of the 1-trial sweep minus one trial is the fixed cost (imports, Ray start, data
   load and `ray.put`, MLflow setup, final report).

Without --address a local Ray starts with its own token in a temporary folder (nothing is written
to ~/.ray). Numbers on a shared machine are noisy: run it twice.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raven.config import TrainConfig
from raven.data import load_splits
from raven.sweep.selection import ObjectiveSettings, validation_objective
from raven.train import train

SIGMA_SCRIPT = Path(__file__).resolve().parent / "sigma_aug.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray_overhead.py", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="N, the extra trials of the larger sweep (default 8)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=500, help="training images per trial (default 500)")
    parser.add_argument("--objective-images", type=int, default=50)
    parser.add_argument("--objective-steps", type=int, default=2)
    parser.add_argument("--objective-probe-images", type=int, default=300)
    parser.add_argument("--address", default=None, help="a running Ray cluster (default: a local Ray)")
    parser.add_argument("--data-dir", default=None)
    return parser


def in_process(args) -> list[float]:
    """Seconds per trial (training + objective) with the data already in memory."""
    torch.set_num_threads(1)  # as a trial with --cpus-per-trial 1
    splits = load_splits("mnist", args.data_dir, "cpu", validation_size=5000)
    settings = ObjectiveSettings(val_limit=args.objective_images, steps=args.objective_steps,
                                 probe_limit=args.objective_probe_images)
    sigmas = [0.01] + [10 ** (-3 + 3 * i / max(1, args.trials)) for i in range(args.trials)]
    seconds = []
    for sigma in sigmas:
        started = time.perf_counter()
        result = train(TrainConfig(method="raven", dataset="mnist", epochs=args.epochs, limit=args.limit,
                                   sigma_aug=sigma), splits=splits, device="cpu", progress=False)
        validation_objective(result.model, splits, settings)
        seconds.append(time.perf_counter() - started)
    return seconds


def through_ray(args, trials: int, work: Path, env: dict[str, str]) -> tuple[float, list[float]]:
    """(wall seconds of the sweep, seconds inside each trainable) for a sweep of `trials` trials."""
    name = f"overhead-{trials}"
    cmd = [sys.executable, str(SIGMA_SCRIPT), "--smoke", "--num-samples", str(trials), "--max-concurrent", "1",
           "--epochs", str(args.epochs), "--limit", str(args.limit), "--evaluate-top", "0",
           "--objective-images", str(args.objective_images), "--objective-steps", str(args.objective_steps),
           "--objective-probe-images", str(args.objective_probe_images), "--cpus-per-trial", "1",
           "--storage-path", str(work / "ray_results"), "--tracking-uri", f"sqlite:///{work / (name + '.db')}",
           "--name", name]
    if args.address:
        cmd += ["--address", args.address]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, start_new_session=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"ray_overhead.py: the {trials}-trial sweep failed:\n{proc.stderr[-3000:]}")
    inside = []
    for progress in (work / "ray_results" / name).glob("trial_*/progress.csv"):
        with open(progress) as f:
            rows = list(csv.DictReader(f))
        if rows:
            inside.append(float(rows[-1]["time_total_s"]))
    return wall, inside


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trials < 1:
        raise SystemExit("ray_overhead.py: --trials must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="rovh", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if not args.address:
        token = work / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(work))
        env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        loop = in_process(args)
        small, _ = through_ray(args, 1, work, env)
        large, inside = through_ray(args, 1 + args.trials, work, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_trial_loop = statistics.mean(loop[1:]) if len(loop) > 1 else loop[0]
    per_trial_ray = (large - small) / args.trials
    print(f"budget: {args.epochs} epoch(s) on {args.limit} images, objective on {args.objective_images} validation "
          f"images ({args.objective_steps} PGD steps, probe on {args.objective_probe_images}); "
          f"{'cluster ' + args.address if args.address else 'local Ray'}")
    print(f"in-process loop:            {per_trial_loop:6.2f} s per trial (mean of {len(loop) - 1} after the first)")
    print(f"through Ray Tune:           {per_trial_ray:6.2f} s per extra trial "
          f"({small:.1f} s for 1 trial, {large:.1f} s for {1 + args.trials})")
    if inside:
        print(f"  inside the trainable:     {statistics.mean(inside):6.2f} s per trial (Tune's time_total_s)")
    print(f"Ray overhead per trial:     {per_trial_ray - per_trial_loop:6.2f} s")
    print(f"fixed cost of a sweep:      {small - per_trial_ray:6.2f} s (start-up and wrap-up, once per sweep)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
