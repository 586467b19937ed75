"""The `raven` command: `raven train`, and the subcommands registered below it.

User mistakes end in one line on stderr (`raven: error: ...`) and exit status 2, before
any data is read or any model is built.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raven.config import DATASETS, METHODS, ConfigError, TrainConfig


def _sigma_list(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train one model and write its checkpoint and metrics.json")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--dataset", default="mnist", choices=DATASETS)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/METHOD-DATASET-sSEED); an existing checkpoint there is resumed")
    p.add_argument("--sigma-aug", type=_sigma_list, default=None,
                   help="std of a(z|z~) (Definition 1): one number or one per latent dimension "
                        "(default: the paper's, 0.01 MNIST / 0.04 Fashion-MNIST)")
    p.add_argument("--noise-std", type=float, default=0.05, help="pixel noise of the training pair (default 0.05)")
    p.add_argument("--eta", type=float, default=None, help="Smooth Encoder coupling (default: 500 MNIST / 5000 F-MNIST)")
    p.add_argument("--se-epsilon", type=float, default=0.1, help="Smooth Encoder training L-inf radius (default 0.1)")
    p.add_argument("--se-steps", type=int, default=5, help="PGD steps for the Smooth Encoder partner (default 5)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the KL/prior term (default 1)")
    p.add_argument("--n-components", type=int, default=10, help="mixture components for raven-gmm (default 10)")
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images")
    p.add_argument("--data-dir", default=None, help="data root (default: $RAVEN_DATA_DIR, else ~/.cache/raven/data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out and start over")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from raven.train import resolve_device, train

    config = TrainConfig(
        method=args.method, dataset=args.dataset, sigma_aug=args.sigma_aug, noise_std=args.noise_std,
        eta=args.eta, se_epsilon=args.se_epsilon, se_steps=args.se_steps, beta=args.beta,
        n_components=args.n_components, latent_dim=args.latent_dim, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, limit=args.limit,
    )
    device = resolve_device(args.device)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raven", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
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
