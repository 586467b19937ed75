"""Benchmarks, printed as tables with ratios against a baseline measured in the same process.

    python -m raven.bench train [--steps N] [--device D] [--data-dir DIR]
    python -m raven.bench attack [--images N] [--steps 50] [--batch-size B] [--device D] [--checkpoint DIR]
                                 [--no-strong]

`train`: training images per second of this package's loop (in-memory tensors, one
slice per batch) for the plain VAE and for paired RAVEN (two images per training
example), against the same architecture, optimiser and objective fed the usual way:
torchvision's MNIST with ToTensor through a DataLoader, batch 128.

`attack`: test images attacked per second by a full 50-step L-inf PGD on the encoder
(KL and W2 attacks of raven.attacks, chunked), against a plain reference PGD loop
written out below (batches of 100, one autograd.grad per step, last iterate). Then the
strong protocol (raven.protocols, its default settings, probe fitted on 10,000 training
images): images per second at delta 0.1, and the seconds of the whole protocol over the
paper's delta grid with and without its checks (`--no-strong` skips both).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from raven.config import TrainConfig
from raven.data import default_data_dir, load_splits
from raven.train import build_model, method_loss, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(config: TrainConfig, batches: Iterator[torch.Tensor], steps: int, warmup: int,
                device: torch.device) -> float:
    """Images per second over `steps` optimiser steps after `warmup` untimed ones."""
    model = build_model(config).to(device)
    optimizer = torch.optim.RAdam(model.parameters(), lr=config.lr)
    generator = torch.Generator(device=device).manual_seed(0)
    images = 0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            started = time.perf_counter()
            images = 0
        x = next(batches)
        loss = method_loss(model, config, x, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        images += len(x)
    _sync(device)
    return images / (time.perf_counter() - started)


def _tensor_batches(train_x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    while True:
        order = torch.randperm(len(train_x), generator=generator, device=device)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield train_x[order[start:start + batch_size]]


def _dataloader_batches(root: Path, batch_size: int, device: torch.device, workers: int) -> Iterator[torch.Tensor]:
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    while True:
        for x, _ in loader:
            yield x.view(len(x), -1).to(device, non_blocking=True)


def _unpacked_mnist(data_dir: Path, into: Path) -> Path:
    """torchvision's MNIST class reads uncompressed files; unpack the (possibly read-only) root."""
    raw = into / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        source = data_dir / "MNIST" / "raw" / name
        if source.is_file():
            shutil.copy(source, raw / name)
        else:
            with gzip.open(source.with_name(name + ".gz"), "rb") as f_in, open(raw / name, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
    return into


def print_table(title: str, rows: list[tuple[str, float]], unit: str, baseline: str) -> None:
    base = dict(rows)[baseline]
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print(f"{'configuration':<{width}}  {unit:>14}  {'vs baseline':>11}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14,.0f}  {value / base:>10.2f}x")


def bench_train(args: argparse.Namespace) -> list[tuple[str, float]]:
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    data_dir = default_data_dir(args.data_dir)
    splits = load_splits("mnist", data_dir, device)
    vae = TrainConfig(method="vae", batch_size=args.batch_size)
    paired = TrainConfig(method="raven", batch_size=args.batch_size)
    measure: dict[str, Callable[[], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = _unpacked_mnist(data_dir, Path(tmp))
        baseline = f"VAE, torchvision DataLoader+ToTensor, batch {args.batch_size}, {args.workers} workers"
        measure[baseline] = lambda: _time_steps(
            vae, _dataloader_batches(root, args.batch_size, device, args.workers), args.steps, args.warmup, device)
        measure[f"VAE, raven loop, batch {args.batch_size}"] = lambda: _time_steps(
            vae, _tensor_batches(splits.train_x, args.batch_size, device), args.steps, args.warmup, device)
        measure[f"RAVEN paired (2 images/example), raven loop, batch {args.batch_size}"] = lambda: _time_steps(
            paired, _tensor_batches(splits.train_x, args.batch_size, device), args.steps, args.warmup, device)
        # Rounds alternate the configurations so that a burst of load elsewhere hits all of
        # them alike; the median round is reported.
        samples: dict[str, list[float]] = {name: [] for name in measure}
        for _ in range(args.rounds):
            for name, run in measure.items():
                samples[name].append(run())
        rows = [(name, statistics.median(values)) for name, values in samples.items()]
    print_table(f"Training throughput on {device} ({torch.get_num_threads()} threads, median of {args.rounds} "
                f"rounds of {args.steps} timed steps, torch {torch.__version__})", rows, "images/s", baseline)
    return rows


def _reference_pgd(model: torch.nn.Module, x: torch.Tensor, delta: float, steps: int, batch: int = 100) -> torch.Tensor:
    """A plain PGD loop (KL attack) as one would first write it: batches of 100, no tricks."""
    from raven.gaussians import diag_gaussian_kl

    out = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        with torch.no_grad():
            mu, logvar = model.encoder(xb)
        x_adv = (xb + delta * (2 * torch.rand_like(xb) - 1)).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            mu_adv, logvar_adv = model.encoder(x_adv)
            loss = diag_gaussian_kl(mu, logvar, mu_adv, logvar_adv).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + delta / 25 * grad.sign()
            x_adv = torch.min(torch.max(x_adv, xb - delta), xb + delta).clamp(0, 1)
        out.append(x_adv.detach())
    return torch.cat(out)


def bench_attack(args: argparse.Namespace) -> list[tuple[str, float]]:
    from raven.attacks import attack

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from raven.train import load_checkpoint

        model = load_checkpoint(args.checkpoint, map_location=device)
    else:
        model = build_model(TrainConfig(method="vae")).to(device).eval()
    splits = load_splits("mnist", args.data_dir, device)
    x = splits.test_x[:args.images]
    delta = 0.1

    def timed(run: Callable[[], object]) -> float:
        run() if args.warmup else None  # one untimed pass: allocator and kernels warm
        best = 0.0
        for _ in range(args.repeats):
            _sync(device)
            started = time.perf_counter()
            run()
            _sync(device)
            best = max(best, len(x) / (time.perf_counter() - started))
        return best

    baseline = f"reference PGD loop (KL), batches of 100, {args.steps} steps"
    measure: dict[str, Callable[[], float]] = {
        baseline: lambda: timed(lambda: _reference_pgd(model, x, delta, args.steps)),
    }
    for kind in ("kl", "w2"):
        measure[f"raven.attacks {kind}, chunks of {args.batch_size}, {args.steps} steps"] = (
            lambda kind=kind: timed(lambda: attack(model, x, delta, kind, steps=args.steps, batch_size=args.batch_size,
                                                   generator=torch.Generator(device=device).manual_seed(0))))
    if args.strong:
        from raven.evaluate import PAPER_DELTAS
        from raven.probe import encode_mean, train_linear_probe
        from raven.protocols import StrongConfig, strong_protocol, worst_case

        probe, _ = train_linear_probe(encode_mean(model, splits.train_x[:10000]), splits.train_y[:10000])
        y = splits.test_y[:args.images]
        strong = StrongConfig()
        measure["strong protocol (5 PGD attacks per iterate + AutoAttack), one delta"] = lambda: timed(
            lambda: worst_case(model, probe, x, y, delta, strong, seed=0, batch_size=args.batch_size))
    rows = [(name, run()) for name, run in measure.items()]
    print_table(f"PGD attack throughput on {device} ({torch.get_num_threads()} threads, {len(x)} test images, "
                f"delta {delta}, best of {args.repeats}, torch {torch.__version__})", rows, "images/s", baseline)
    if args.strong:
        out = strong_protocol(model, probe, x, y, PAPER_DELTAS, strong, seed=0, batch_size=args.batch_size)
        robust = ", ".join(f"{k} {v:.3f}" for k, v in out["robust_accuracy"].items())
        print(f"\nstrong protocol over the paper's grid ({len(PAPER_DELTAS)} deltas, {len(x)} images): "
              f"{out['seconds']:.1f} s, checks {out['check_seconds']:.1f} s more; robust accuracy {robust}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raven.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("train", help="training images/s against the DataLoader baseline")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the baseline (default 0)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported (default 3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=bench_train)
    p = sub.add_parser("attack", help="images attacked per second (50-step PGD) against a plain PGD loop")
    p.add_argument("--images", type=int, default=2000, help="test images per timed pass (default 2000)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1000, help="chunk size of raven.attacks (default 1000)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes; the best is reported (default 2)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first pass")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint", default=None, help="a trained model (default: a freshly initialised VAE)")
    p.add_argument("--no-strong", dest="strong", action="store_false", help="skip the strong protocol")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=bench_attack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
