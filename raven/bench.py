"""Benchmarks, printed as tables with ratios against a baseline measured in the same process.

    python -m raven.bench train [--steps N] [--device D] [--data-dir DIR]
    python -m raven.bench attack [--images N] [--steps 50] [--batch-size B] [--device D] [--checkpoint DIR]
                                 [--no-strong]
    python -m raven.bench pack [--ks 1,5,25] [--steps N] [--method M] [--device D] [--no-estimate] [size flags]
    python -m raven.bench precision [--stages train,attack,fid] [--ks 5,25] [--steps N] [--images N]
                                    [--checkpoint DIR] [--fid-images N] [--device D]

`train`: training images per second of this package's loop (in-memory tensors, one
slice per batch) for the plain VAE and for paired RAVEN (two images per training
example), against the same architecture, optimiser and objective fed the usual way:
torchvision's MNIST with ToTensor through a DataLoader, batch 128.

`attack`: test images attacked per second by a full 50-step L-inf PGD on the encoder
(KL and W2 attacks of raven.eval.attacks, chunked), against a plain reference PGD loop
written out below (batches of 100, one autograd.grad per step, last iterate). Then the
strong protocol (raven.eval.protocols, its default settings, probe fitted on 10,000 training
images): images per second at delta 0.1, and the seconds of the whole protocol over the
paper's delta grid with and without its checks (`--no-strong` skips both).

`pack`: training pairs (images for vae and se) per second of K seeds trained as one pack
(raven.pack) against the same K seeds trained one after another by the solo loop's step,
same data, same number of steps, for each K; then the estimated device time of the full
reproduction, built from measured pieces (see estimate_reproduction).

`precision`: fp32 against bf16 in one process, with the ratio. Training pairs per second
(images for vae and se) of the solo step and of packs of each K, in alternating rounds;
then test images attacked per second by the paper's KL attack and by the strong protocol's
per-iterate PGD (AutoAttack left out: it runs in fp32 either way), with the share of images
each fools; then FID's Inception: images per second of the TorchScript network as shipped, of
FastInception in fp32 and in bf16, and the FID each gives between test images and blurred
copies of them, beside the fp32 FID it must stay within 0.5 of.
"""

from __future__ import annotations

import argparse
import gzip
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from raven.checkpoints import load_checkpoint, write_checkpoint
from raven.config import METHODS, PRECISIONS, TrainConfig
from raven.cuda_graphs import graphs_wanted
from raven.data import DataSplits, default_data_dir, load_splits
from raven.eval.attacks import PAPER_STEP_DIVISOR, attack
from raven.eval.autoattack import ProbeOnMean
from raven.eval.certify import certify
from raven.eval.evaluate import PAPER_DELTAS, encode_mean, train_linear_probe, tsne_embedding
from raven.eval.fid import InceptionFeatures, _inception_input, _load_network, fid_available, frechet_distance
from raven.eval.pack_eval import attack_pack
from raven.eval.protocols import StrongConfig, worst_case
from raven.pack import PackedTrainer, stack_modules
from raven.reproduce.grid import TEST_IMAGES, TRAIN_SPLIT_IMAGES, Budget, machine_description
from raven.step import bf16_is_native, build_model, make_optimizer, method_loss, train_step, training_noisy_copy, validation_metrics
from raven.train import resolve_device


PRECISION_STAGES = ("train", "attack", "fid")


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
    from raven.eval.attacks import attack

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from raven.checkpoints import load_checkpoint

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
        measure[f"raven.eval.attacks {kind}, chunks of {args.batch_size}, {args.steps} steps"] = (
            lambda kind=kind: timed(lambda: attack(model, x, delta, kind, steps=args.steps, batch_size=args.batch_size,
                                                   generator=torch.Generator(device=device).manual_seed(0))))
    if args.strong:
        from raven.eval.evaluate import PAPER_DELTAS
        from raven.eval.probe import encode_mean, train_linear_probe
        from raven.eval.protocols import StrongConfig, strong_protocol, worst_case

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


def bench_certify(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Certified bounds over the paper's delta grid: IBP (the baseline) and CROWN, in float64 and float32."""
    device = resolve_device(args.device)
    if args.checkpoint:
        from raven.checkpoints import load_checkpoint

        model = load_checkpoint(args.checkpoint, map_location=device)
    else:
        model = build_model(TrainConfig(method="vae")).to(device).eval()
    splits = load_splits("mnist", args.data_dir, device)
    x, y = splits.test_x[:args.images], splits.test_y[:args.images]
    probe, _ = train_linear_probe(encode_mean(model, splits.train_x[:10000]), splits.train_y[:10000])
    classifier = ProbeOnMean(model.encoder, probe)
    deltas = [d for d in PAPER_DELTAS if d > 0]
    rows, certified = [], {}
    for name, method, dtype in (("IBP, float64", "ibp", torch.float64), ("CROWN, float64", "crown", torch.float64),
                                ("CROWN, float32", "crown", torch.float32)):
        _sync(device)
        started = time.perf_counter()
        for delta in deltas:
            certified[name, delta] = float(certify(classifier, x, y, delta, method=method, dtype=dtype)[0]
                                           .double().mean())
        _sync(device)
        rows.append((f"{name}, {len(deltas)} deltas", len(x) / (time.perf_counter() - started)))
    print_table(f"Certified bounds on {device} ({torch.get_num_threads()} threads, {len(x)} test images, deltas "
                f"{','.join(f'{d:g}' for d in deltas)}, torch {torch.__version__})", rows, "images/s", rows[0][0])
    for name in ("IBP, float64", "CROWN, float64", "CROWN, float32"):
        print(f"certified accuracy, {name}: " + ", ".join(f"{d:g} {certified[name, d]:.3f}" for d in deltas))
    return rows


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - started


def _pack_step_seconds(configs: list[TrainConfig], train_x: torch.Tensor, steps: int, warmup: int,
                       graphs: bool) -> float:
    """Seconds per step of the pack of `configs` (full batches), after `warmup` untimed steps."""
    device = train_x.device
    copies = [training_noisy_copy(c, train_x) for c in configs]
    trainer = PackedTrainer(configs, train_x, [build_model(c).to(device) for c in configs],
                            [torch.Generator(device=device).manual_seed(c.seed) for c in configs],
                            [None] * len(configs), None if copies[0] is None else copies, cuda_graphs=graphs)
    batch = configs[0].batch_size
    per_epoch = len(train_x) // batch
    order = trainer.epoch_order()

    def run(first: int, count: int) -> None:
        for i in range(first, first + count):
            trainer.step(order[:, (i % per_epoch) * batch:(i % per_epoch + 1) * batch])

    run(0, warmup)
    return _seconds(lambda: run(warmup, steps), device) / steps


def _solo_step_seconds(configs: list[TrainConfig], train_x: torch.Tensor, steps: int, warmup: int) -> float:
    """Seconds per step of all `configs` trained one after another by the solo loop's step."""
    device = train_x.device
    total = 0.0
    for config in configs:
        model = build_model(config).to(device)
        optimizer = make_optimizer(model.parameters(), config.lr)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        order = torch.randperm(len(train_x), generator=generator, device=device)
        per_epoch = len(train_x) // config.batch_size
        copy = training_noisy_copy(config, train_x)
        sums: dict[str, torch.Tensor] = {}

        def run(first: int, count: int) -> None:
            for i in range(first, first + count):
                index = order[(i % per_epoch) * config.batch_size:(i % per_epoch + 1) * config.batch_size]
                terms = train_step(model, optimizer, config, train_x[index], generator,
                                   None if copy is None else copy[index])
                with torch.no_grad():  # the solo loop's per-step bookkeeping, on the device
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + value.detach()

        run(0, warmup)
        total += _seconds(lambda: run(warmup, steps), device)
    return total / steps


def bench_pack(args: argparse.Namespace) -> list[tuple[str, float]]:
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    graphs = graphs_wanted(device, False if args.no_graphs else None)
    splits = load_splits("mnist", args.data_dir, device)
    base = TrainConfig(method=args.method, batch_size=args.batch_size)
    unit = "pairs/s" if base.paired else "images/s"
    rows = []
    for k in args.ks:
        configs = [base.replace(seed=seed) for seed in range(k)]
        solo = k * args.batch_size / _solo_step_seconds(configs, splits.train_x, args.steps, args.warmup)
        packed = k * args.batch_size / _pack_step_seconds(configs, splits.train_x, args.steps, args.warmup, graphs)
        rows.append((k, solo, packed))
    one = rows[0][1] if rows[0][0] == 1 else None
    print(f"\nPacked training throughput on {device} ({torch.get_num_threads()} threads, {args.method}, batch "
          f"{args.batch_size}, {args.steps} timed steps after {args.warmup}, CUDA graphs {'on' if graphs else 'off'}, "
          f"torch {torch.__version__})")
    print(f"{'K':>4}  {'K solo ' + unit:>17}  {'pack of K ' + unit:>20}  {'pack/solo':>9}"
          + (f"  {'pack/one model':>14}" if one else ""))
    for k, solo, packed in rows:
        print(f"{k:>4}  {solo:>17,.0f}  {packed:>20,.0f}  {packed / solo:>8.2f}x"
              + (f"  {packed / one:>13.2f}x" if one else ""))
    if args.estimate:
        estimate_reproduction(args, device, graphs, splits)
    return [(f"K={k} packed", packed) for k, _, packed in rows]


def estimate_reproduction(args: argparse.Namespace, device: torch.device, graphs: bool, splits: DataSplits) -> float:
    """Device time of sweeps/reproduce.py at the full budget, from measured pieces; returns seconds.

    Training: each (dataset, method) is one pack of `seeds` members, `epochs` epochs (an
    upper bound: early stopping usually ends sooner) of ceil(55,000 / batch) steps, each
    epoch also validating every member (val_loss, val_elbo, val_mse_255 on 5,000 images)
    and writing its checkpoint. Fashion-MNIST has MNIST's shapes, so MNIST timings stand
    for both. Evaluation, per model (raven.eval.evaluate at the full budget): the linear probe
    (encoder means of 55,000 images, L-BFGS), 50-step PGD with KL and W2 on 10,000 test
    images at every nonzero delta (a pack's seeds in one batched pass, raven.eval.pack_eval), FID (Inception features of the test images and their
    reconstructions, then the Frechet distance on the CPU) and the t-SNE (CPU, sklearn).
    """
    budget = Budget()
    steps_per_epoch = math.ceil(TRAIN_SPLIT_IMAGES / args.batch_size)
    val_x = splits.val_x[:args.val_images]
    print(f"\nEstimated device time of the full reproduction on {device}: {len(budget.datasets)} datasets x "
          f"{len(budget.methods)} methods x {budget.seeds} seeds, each (dataset, method) one pack of {budget.seeds}, "
          f"at most {budget.epochs} epochs of {steps_per_epoch} steps")
    print(f"{'training, per pack of ' + str(budget.seeds):<34} {'s/step':>8} {'s/epoch':>8} {'val s':>7} "
          f"{'ckpt s':>7} {'total min':>10}")
    training = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for method in budget.methods:
            base = TrainConfig(method=method, batch_size=args.batch_size)
            configs = [base.replace(seed=seed) for seed in range(budget.seeds)]
            step = _pack_step_seconds(configs, splits.train_x, args.estimate_steps, args.warmup, graphs)
            model = build_model(base).to(device)
            validation = (_seconds(lambda: validation_metrics(model, base, val_x), device)
                          * len(splits.val_x) / len(val_x))
            optimizer = make_optimizer(model.parameters(), base.lr)
            generator = torch.Generator(device=device).manual_seed(0)
            train_step(model, optimizer, base, splits.train_x[:args.batch_size], generator)  # optimizer state to save
            history = [{"val_elbo": 0.0}]
            checkpoint = _seconds(lambda: write_checkpoint(Path(tmp), base, model.state_dict(), optimizer.state_dict(),
                                                           generator, history, device, TRAIN_SPLIT_IMAGES), device)
            per_epoch = step * steps_per_epoch + budget.seeds * (validation + checkpoint)
            method_total = len(budget.datasets) * budget.epochs * per_epoch
            training += method_total
            print(f"{method:<34} {step:>8.4f} {step * steps_per_epoch:>8.2f} {validation:>7.3f} {checkpoint:>7.3f} "
                  f"{method_total / 60:>10.1f}")

    model = build_model(TrainConfig(method="vae")).to(device).eval()
    probe_x, probe_y = splits.train_x[:args.probe_images], splits.train_y[:args.probe_images]
    probe = _seconds(lambda: train_linear_probe(encode_mean(model, probe_x), probe_y), device) \
        * TRAIN_SPLIT_IMAGES / len(probe_x)
    x, y = splits.test_x[:args.eval_images], splits.test_y[:args.eval_images]
    nonzero = [d for d in PAPER_DELTAS if d > 0]
    # The reproduction attacks a pack's seeds in one batched pass (raven.eval.pack_eval): time a pack, per model.
    members = [build_model(TrainConfig(method="vae", seed=seed)).to(device) for seed in range(budget.seeds)]
    encoder = stack_modules([m.encoder for m in members]).requires_grad_(False).eval()
    probes = stack_modules([torch.nn.Linear(model.latent_dim, 10).to(device) for _ in members]).requires_grad_(False)
    attacks = {kind: _seconds(lambda kind=kind: attack_pack(
        encoder, probes, x, y, 0.1, kind, steps=budget.steps, step_size=0.1 / PAPER_STEP_DIVISOR, restarts=1,
        random_start=True, generators=[torch.Generator(device=device).manual_seed(s) for s in range(len(members))],
        batch_size=1000), device) * len(nonzero) * TEST_IMAGES / len(x) / len(members) for kind in ("kl", "w2")}
    fid_s, fd_s, fid_note = 0.0, 0.0, ""
    ok, reason = fid_available()
    if ok and args.fid_images > 0:
        extractor = InceptionFeatures(device)
        images = splits.test_x[:args.fid_images]
        extractor(images[:2])  # load and warm the network
        fid_s = _seconds(lambda: extractor(images), device) * 2 * TEST_IMAGES / len(images)
        features = torch.randn(2, args.fd_rows, 2048, generator=torch.Generator().manual_seed(0)).double().numpy()
        fd_s = _seconds(lambda: frechet_distance(features[0], features[1]), torch.device("cpu"))
    else:
        fid_note = f" (FID not measured: {reason or '--fid-images 0'})"
    mu = encode_mean(model, splits.test_x[:args.tsne_points])
    tsne = _seconds(lambda: tsne_embedding(mu, mu + 0.01, 0), torch.device("cpu"))
    per_model = probe + sum(attacks.values()) + fid_s + fd_s + tsne
    models = len(budget.datasets) * len(budget.methods) * budget.seeds
    evaluation = models * per_model
    print(f"evaluation, per model: probe {probe:.1f} s, PGD kl {attacks['kl']:.1f} s and w2 {attacks['w2']:.1f} s "
          f"({len(nonzero)} deltas x {TEST_IMAGES:,} images x {budget.steps} steps, in packs of {budget.seeds}), FID Inception {fid_s:.1f} s "
          f"({2 * TEST_IMAGES:,} images) + Frechet {fd_s:.1f} s (CPU), t-SNE {tsne:.1f} s (CPU, "
          f"{2 * args.tsne_points} points){fid_note}; {models} models: {evaluation / 60:.1f} min")
    total = training + evaluation
    print(f"total: {training / 60:.1f} min training (an upper bound: every pack runs all {budget.epochs} epochs) + "
          f"{evaluation / 60:.1f} min evaluation = {total / 60:.1f} min, one model or pack at a time; the CPU parts "
          f"(Frechet, t-SNE: {models * (fd_s + tsne) / 60:.1f} min) can overlap the device work")
    return total


def _pack_sizes(text: str) -> list[int]:
    try:
        sizes = [int(k) for k in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated pack sizes >= 1, got {text!r}")
    return sizes


def print_precision_table(title: str, rows: list[tuple[str, float, float]], unit: str) -> None:
    """Rows of (configuration, fp32 value, bf16 value) with the ratio bf16 / fp32."""
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{title}")
    print(f"{'configuration':<{width}}  {'fp32 ' + unit:>16}  {'bf16 ' + unit:>16}  {'bf16/fp32':>9}")
    for name, fp32, bf16 in rows:
        print(f"{name:<{width}}  {fp32:>16,.0f}  {bf16:>16,.0f}  {bf16 / fp32:>8.2f}x")


def _precision_train(args: argparse.Namespace, device: torch.device, train_x: torch.Tensor) -> None:
    """Training pairs/s (images for vae and se) in fp32 and bf16: the solo step, then packs of each K."""
    batch = args.batch_size

    def configs(k: int, precision: str) -> list[TrainConfig]:
        return [TrainConfig(method=args.method, batch_size=batch, precision=precision, seed=s) for s in range(k)]

    graphs = graphs_wanted(device, None)
    measure: dict[str, Callable[[str], float]] = {
        "solo (raven.step.train_step)": lambda p: batch / _solo_step_seconds(configs(1, p), train_x, args.steps,
                                                                             args.warmup)}
    for k in args.ks:
        measure[f"pack of {k}" + (", CUDA graphs" if graphs else "")] = (
            lambda p, k=k: k * batch / _pack_step_seconds(configs(k, p), train_x, args.steps, args.warmup, graphs))
    # Alternating rounds: a burst of load elsewhere hits both precisions alike; the median round is reported.
    samples = {(name, p): [] for name in measure for p in PRECISIONS}
    for _ in range(args.rounds):
        for name, run in measure.items():
            for p in PRECISIONS:
                samples[name, p].append(run(p))
    rows = [(name, statistics.median(samples[name, "fp32"]), statistics.median(samples[name, "bf16"]))
            for name in measure]
    print_precision_table(f"Training ({args.method}, batch {batch}) on {device} ({torch.get_num_threads()} threads, "
                          f"median of {args.rounds} rounds of {args.steps} timed steps, torch {torch.__version__})",
                          rows, "pairs/s")


def _precision_fid(args: argparse.Namespace, device: torch.device, test_x: torch.Tensor) -> None:
    """Inception images/s of the scripted network as shipped, FastInception fp32 and bf16, and the FID each gives
    between test images and blurred copies of them (reconstruction-like)."""
    ok, reason = fid_available()
    if not ok:
        print(f"\nFID not measured: {reason}")
        return
    images = test_x[:args.fid_images]
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    kernel = (kernel[:, None] * kernel[None, :] / 256).reshape(1, 1, 5, 5)
    blurred = torch.nn.functional.conv2d(images.reshape(-1, 1, 28, 28), kernel, padding=2).reshape(-1, 784)
    scripted = _load_network(device)

    def scripted_features(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([scripted(_inception_input(b)).double().cpu()
                              for b in x.split(args.fid_batch_size)]).numpy()

    extractors = {"TorchScript network as shipped, fp32": scripted_features}
    for precision in PRECISIONS:
        if precision == "bf16" and not bf16_is_native(device):
            print(f"\nFastInception, bf16: not measured (no native bfloat16 on this {device.type})")
            continue
        extractors[f"FastInception, {precision}"] = InceptionFeatures(device, args.fid_batch_size, progress=False,
                                                                      precision=precision)
    rows = []
    for name, extract in extractors.items():
        extract(images[:2])  # load and warm the network
        _sync(device)
        started = time.perf_counter()
        features = extract(torch.cat([images, blurred.clamp(0, 1)]))
        _sync(device)
        rate = 2 * len(images) / (time.perf_counter() - started)
        rows.append((name, rate, frechet_distance(features[:len(images)], features[len(images):])))
    base_rate, base_fid = rows[0][1], rows[1][2]
    width = max(len(name) for name, _, _ in rows)
    print(f"\nFID Inception on {device} ({torch.get_num_threads()} threads, {len(images)} test images and as many "
          f"blurred copies, batch {args.fid_batch_size}, torch {torch.__version__}); the guard: |FID - fp32 FID| < 0.5")
    print(f"{'configuration':<{width}}  {'images/s':>10}  {'vs shipped':>10}  {'FID':>9}  {'FID - fp32':>10}")
    for name, rate, value in rows:
        print(f"{name:<{width}}  {rate:>10,.1f}  {rate / base_rate:>9.2f}x  {value:>9.3f}  {value - base_fid:>+10.3f}")


def _precision_attack(args: argparse.Namespace, device: torch.device, splits: DataSplits) -> None:
    """Images/s of the paper's KL attack and of the strong protocol's per-iterate PGD in fp32 and bf16, and the
    share of images each fools (the guard: bf16 fools no fewer than fp32, to within 0.5 points)."""
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, map_location=device)
    else:
        model = build_model(TrainConfig(method="vae")).to(device).eval()
    probe, _ = train_linear_probe(encode_mean(model, splits.train_x[:10000]), splits.train_y[:10000])
    x, y = splits.test_x[:args.images], splits.test_y[:args.images]
    delta = 0.1

    def paper(precision: str) -> torch.Tensor:
        out = attack(model, x, delta, "kl", steps=args.attack_steps, batch_size=args.attack_batch_size, probe=probe,
                     y=y, generator=torch.Generator(device=device).manual_seed(0), precision=precision)
        return ~out.correct

    def strong(precision: str) -> torch.Tensor:
        config = StrongConfig(steps=args.attack_steps, autoattack=False, precision=precision)
        overall, _, _ = worst_case(model, probe, x, y, delta, config, seed=0, batch_size=args.attack_batch_size)
        return ~overall

    measure = {f"paper KL attack, {args.attack_steps} steps": paper,
               f"strong protocol's PGD ({','.join(StrongConfig().attacks)}, per iterate), {args.attack_steps} steps, "
               "AutoAttack left out (fp32 either way)": strong}
    rows, fooled = [], {}
    for name, run in measure.items():
        rates = {}
        for precision in PRECISIONS:
            if args.warmup:  # one untimed pass first
                run(precision)
            seconds = _seconds(lambda p=precision: fooled.__setitem__((name, p), run(p)), device)
            rates[precision] = len(x) / seconds
        rows.append((name, rates["fp32"], rates["bf16"]))
    print_precision_table(f"Attacks on {device} ({torch.get_num_threads()} threads, {len(x)} test images, delta "
                          f"{delta}, chunks of {args.attack_batch_size}, torch {torch.__version__})", rows, "images/s")
    for name, _, _ in rows:
        share = {p: float(fooled[name, p].double().mean()) * 100 for p in PRECISIONS}
        print(f"{name}: fooled fp32 {share['fp32']:.1f} %, bf16 {share['bf16']:.1f} % "
              f"({share['bf16'] - share['fp32']:+.1f} points; the guard: no less than -0.5)")


def bench_precision(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    splits = load_splits("mnist", args.data_dir, device)
    # The ratios turn on the hardware: bf16 is fast only where it is native (raven.step.bf16_is_native).
    print(f"precision on {device}: {machine_description()}; native bfloat16: "
          f"{'yes' if bf16_is_native(device) else 'no, torch emulates it'}")
    if "train" in args.stages:
        _precision_train(args, device, splits.train_x)
    if "attack" in args.stages:
        _precision_attack(args, device, splits)
    if "fid" in args.stages:
        _precision_fid(args, device, splits.test_x)


def _stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",")]
    if not stages or any(s not in PRECISION_STAGES for s in stages):
        raise argparse.ArgumentTypeError(f"expected comma-separated stages from {','.join(PRECISION_STAGES)}, "
                                         f"got {text!r}")
    return stages


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
    p.add_argument("--batch-size", type=int, default=1000, help="chunk size of raven.eval.attacks (default 1000)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes; the best is reported (default 2)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first pass")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint", default=None, help="a trained model (default: a freshly initialised VAE)")
    p.add_argument("--no-strong", dest="strong", action="store_false", help="skip the strong protocol")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=bench_attack)
    p = sub.add_parser("pack", help="pairs/s of K seeds trained as one pack against K solo runs, "
                                    "and the estimated device time of the full reproduction")
    p.add_argument("--ks", type=_pack_sizes, default=[1, 5, 25], help="pack sizes (default 1,5,25)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per member (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first, CUDA graph capture included")
    p.add_argument("--method", default="raven", choices=METHODS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-graphs", action="store_true", help="eager steps on CUDA (no CUDA graphs)")
    p.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip the reproduction estimate")
    p.add_argument("--estimate-steps", type=int, default=50, help="timed pack steps per method for the estimate")
    p.add_argument("--val-images", type=int, default=5000, help="validation images timed (scaled to 5,000)")
    p.add_argument("--probe-images", type=int, default=55000, help="probe images timed (scaled to 55,000)")
    p.add_argument("--eval-images", type=int, default=2000, help="test images attacked (scaled to 10,000)")
    p.add_argument("--fid-images", type=int, default=1000, help="images through Inception (scaled; 0 skips FID)")
    p.add_argument("--fd-rows", type=int, default=10000, help="feature rows of the timed Frechet distance")
    p.add_argument("--tsne-points", type=int, default=1000, help="clean test encodings in the timed t-SNE")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=bench_pack)
    p = sub.add_parser("precision", help="fp32 against bf16: training (solo, packs), attacks, FID's Inception")
    p.add_argument("--stages", type=_stages, default=list(PRECISION_STAGES),
                   help=f"comma-separated, from {','.join(PRECISION_STAGES)} (default all)")
    p.add_argument("--method", default="raven", choices=METHODS, help="training's method (default raven)")
    p.add_argument("--ks", type=_pack_sizes, default=[5, 25], help="pack sizes (default 5,25)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per round (default 30)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first, CUDA graph capture included; 0 also skips the attacks' untimed pass")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported (default 3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=1000, help="test images attacked (default 1000)")
    p.add_argument("--attack-steps", type=int, default=50, help="PGD steps (default 50)")
    p.add_argument("--attack-batch-size", type=int, default=1000, help="images attacked at once (default 1000)")
    p.add_argument("--checkpoint", default=None, help="the model attacked (default: a freshly initialised VAE)")
    p.add_argument("--fid-images", type=int, default=500, help="test images, and as many blurred copies (default 500)")
    p.add_argument("--fid-batch-size", type=int, default=100, help="images per Inception batch (default 100)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=bench_precision)
    p = sub.add_parser("certify", help="certified bounds (IBP, CROWN) per second over the paper's delta grid")
    p.add_argument("--images", type=int, default=10000, help="test images (default all 10,000)")
    p.add_argument("--checkpoint", default=None, help="a trained model (default: a freshly initialised VAE)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=bench_certify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
