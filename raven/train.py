"""The one epoch loop, for a solo run (`train`) and a pack (raven.pack.train_pack).

Every run goes through `train_members`: each member starts from its seed or resumes from its
checkpoint; then, every epoch, the members train one epoch of steps, and each member in turn
gets its NaN guard, validation metrics, checkpoint (raven.checkpoints), log line, EpochReport
and callbacks (Ray Tune and MLflow plug in here). Members leave when they stop early (val_elbo
has stalled), finish or diverge, and join when the loop reaches the epoch they resumed at.
With early stopping on, a member that stops or finishes takes the weights of its best val_elbo
epoch (a CPU copy, taken whenever val_elbo improves) before its last checkpoint is written.

What runs an epoch of steps is a trainer. A solo run's is `SoloTrainer`: one RavenModel, one
step at a time through `raven.step.train_step`, in plain view below. A pack's is
raven.pack.PackedTrainer: K members stacked into batched products. The solo run is a loop of
one member with its own trainer, not a pack of one: on CPU a pack of one computes the solo
run bit for bit, but on CUDA batched products and the graphs' capturable RAdam round
differently, and a solo run's results must not change with the loop that runs it.

All randomness of a member (shuffling, per-step pixel noise, PGD starts, reparameterisation)
comes from its one torch.Generator, whose state is checkpointed, so a resumed run replays
exactly the steps an uninterrupted run would have taken; the fixed noisy copy is drawn from
the seed alone and drawn again identically on resume.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

# The checkpoint and step names are re-exported: the layers above import them from raven.train.
from raven.checkpoints import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    METRICS_NAME,
    best_epoch_of,
    checkpoint_file,
    load_checkpoint,
    load_state,
    resume_state,
    resume_weights,
    write_checkpoint,
)
from raven.config import ConfigError, TrainConfig
from raven.data import DataSplits, load_splits
from raven.models import RavenModel
from raven.step import (  # noqa: F401
    build_model,
    epoch_order,
    make_optimizer,
    method_loss,
    train_step,
    training_noisy_copy,
    validation_metrics,
)

# How often (in steps) the solo loop looks at the loss for NaN/inf: a look forces a device
# sync, and the offending step is recorded on the device either way.
FINITE_CHECK_EVERY = 50


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass(frozen=True)
class EpochReport:
    """What a callback receives after each epoch (epoch counts from 1); `last`: no epoch follows
    (config.epochs reached, or patience ran out); `best_epoch`: the epoch of the best val_elbo so
    far. On the last report with early stopping on, `model` and the checkpoint hold best_epoch's
    weights, while `metrics` are still this epoch's."""

    epoch: int
    metrics: dict[str, float]
    config: TrainConfig
    model: RavenModel
    checkpoint_path: Path | None
    last: bool = False
    best_epoch: int | None = None


class Callback(Protocol):
    def __call__(self, report: EpochReport) -> None: ...


@dataclass
class TrainResult:
    model: RavenModel
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None
    # Set for a pack's member whose loss became non-finite (train() raises instead):
    # the divergence message; model and history are then those of its last good epoch.
    diverged: str | None = None
    # The epoch (from 1) of the best val_elbo in history. With early stopping on (config.patience),
    # `model` and the checkpoint hold this epoch's weights, unless the run diverged.
    best_epoch: int | None = None

    @property
    def final_metrics(self) -> dict[str, float]:
        """The metrics of the epoch whose weights `model` holds (metrics.json's "final")."""
        if not self.history:
            return {}
        restored = self.config.patience is not None and self.diverged is None
        return self.history[self.best_epoch - 1] if restored else self.history[-1]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks the GPU when one is visible; anything else is passed to torch.device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is visible")
    return device


def epochs_since_best(history: list[dict[str, float]]) -> int:
    """Epochs since val_elbo last improved (0 when the latest epoch is the best)."""
    return len(history) - best_epoch_of(history) if history else 0


def should_stop(config: TrainConfig, history: list[dict[str, float]]) -> bool:
    return config.patience is not None and epochs_since_best(history) >= config.patience


def divergence_message(epoch: int, bad_step: int, steps_per_epoch: int, out_path: Path | None) -> str:
    """What TrainingDiverged says: epoch (from 0) and step (from 0) of the first non-finite loss."""
    return (f"loss became NaN or infinite at epoch {epoch + 1}, step {bad_step + 1} of {steps_per_epoch} "
            f"(global step {epoch * steps_per_epoch + bad_step + 1})"
            f"{'; the last good checkpoint is kept in ' + str(out_path) if out_path else ''}"
            "; try a lower --lr or --beta")


@dataclass
class Member:
    """One run of the loop, between epochs: `model` holds its current parameters, `optimizer_state`
    its RAdam state_dict in the solo format (None before its first step), `noisy_copy` its
    `training_noisy_copy` while it trains."""

    index: int
    config: TrainConfig
    label: str
    out_path: Path | None
    model: RavenModel
    generator: torch.Generator
    optimizer_state: dict[str, Any] | None = None
    noisy_copy: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    diverged: str | None = None
    stopped: bool = False
    # A CPU copy of the weights of best_epoch (None: unknown, from a checkpoint written before they were kept).
    best_state: dict[str, torch.Tensor] | None = None
    # Set once early stopping has put best_state into `model`: the last epoch's weights, which resume continues from.
    last_state: dict[str, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return len(self.history)

    @property
    def best_epoch(self) -> int | None:
        return best_epoch_of(self.history)

    @property
    def running(self) -> bool:
        return not (self.stopped or self.diverged) and self.epoch < self.config.epochs


def open_member(index: int, config: TrainConfig, label: str, out_dir: str | os.PathLike | None, resume: bool,
                train_x: torch.Tensor) -> Member:
    """A member fresh from its seed, or from the checkpoint in out_dir when `resume` finds one there."""
    device = train_x.device
    model = build_model(config).to(device)
    model.train()
    member = Member(index, config, label, Path(out_dir) if out_dir is not None else None, model,
                    torch.Generator(device=device).manual_seed(config.seed))
    if member.out_path:
        member.out_path.mkdir(parents=True, exist_ok=True)
        state = resume_state(member.out_path / CHECKPOINT_NAME, config, device) if resume else None
        if state is not None:
            last, best = resume_weights(state)
            model.load_state_dict(last)
            member.best_state = None if best is None else cpu_copy(best)
            member.optimizer_state = state["optimizer"]
            member.generator.set_state(state["generator"].cpu())
            member.history = state["history"]
            assert state["epoch"] == len(member.history), "checkpoint epoch and history disagree"
            if best is None and config.patience is not None:
                raise ConfigError(f"{member.out_path / CHECKPOINT_NAME} does not hold the weights of its best epoch "
                                  f"({member.best_epoch}), which early stopping keeps (an older checkpoint); "
                                  "resume it without --patience, or --fresh to start over")
    if member.running:
        member.noisy_copy = training_noisy_copy(config, train_x)
    return member


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def finish(m: Member) -> str | None:
    """A member that trains no further (its epochs done, or its patience run out). With early stopping
    on, its model takes the weights of its best epoch, the last epoch's kept in last_state for resume.
    Returns what the log says about it (None: nothing)."""
    assert m.last_state is None, "a member finishes once"
    m.stopped = should_stop(m.config, m.history)
    if m.config.patience is None or m.best_epoch == m.epoch:
        return None
    m.last_state = cpu_copy(m.model.state_dict())
    m.model.load_state_dict(m.best_state)
    how = (f"stopped early at epoch {m.epoch}: val_elbo has not improved for {m.config.patience} epochs"
           if m.stopped else f"finished at epoch {m.epoch}")
    return f"{how}; restored epoch {m.best_epoch} (best val_elbo {m.history[m.best_epoch - 1]['val_elbo']:.2f})"


def save(m: Member, device: torch.device, train_images: int) -> None:
    """The member's checkpoint folder after its latest epoch."""
    write_checkpoint(m.out_path, m.config, m.model.state_dict(), m.optimizer_state, m.generator, m.history,
                     device, train_images, best_state=m.best_state, last_state=m.last_state)


class Trainer(Protocol):
    """What the loop asks of the code that runs the members' steps (SoloTrainer, raven.pack.PackedTrainer)."""

    def train_epoch(self, batch_size: int, on_step: Callable[[], None] | None = None
                    ) -> tuple[dict[str, list[float]], list[int]]:
        """One epoch: per member, the sums of every term and the first non-finite step (-1: none)."""

    def member_state(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Member k's model state_dict and its RAdam state_dict in the solo format."""


class SoloTrainer:
    """One member trained by `raven.step.train_step` on its own RavenModel (nn.Linear's arithmetic)."""

    def __init__(self, member: Member, train_x: torch.Tensor) -> None:
        self.model, self.config, self.generator = member.model, member.config, member.generator
        self.train_x, self.noisy_copy = train_x, member.noisy_copy
        self.optimizer = make_optimizer(self.model.parameters(), self.config.lr)
        if member.optimizer_state is not None:
            self.optimizer.load_state_dict(member.optimizer_state)

    def train_epoch(self, batch_size: int, on_step: Callable[[], None] | None = None
                    ) -> tuple[dict[str, list[float]], list[int]]:
        train_x, fixed = self.train_x, self.noisy_copy
        order = epoch_order(len(train_x), self.generator, train_x.device)
        totals: dict[str, torch.Tensor] = {}
        first_bad_step = torch.tensor(-1, device=train_x.device)
        for step in range(math.ceil(len(train_x) / batch_size)):
            index = order[step * batch_size:(step + 1) * batch_size]
            terms = train_step(self.model, self.optimizer, self.config, train_x[index], self.generator,
                               None if fixed is None else fixed[index], len(train_x))
            with torch.no_grad():
                for name, value in terms.items():
                    totals[name] = totals.get(name, 0.0) + value.detach()
                bad_now = (~torch.isfinite(terms["loss"])) & (first_bad_step < 0)
                first_bad_step = torch.where(bad_now, step, first_bad_step)
            if on_step:
                on_step()
            # A diverged run stops at the next look rather than training on NaN to the epoch's end.
            if (step + 1) % FINITE_CHECK_EVERY == 0 and int(first_bad_step) >= 0:
                break
        return {name: [float(total)] for name, total in totals.items()}, [int(first_bad_step)]

    def member_state(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.model.state_dict(), self.optimizer.state_dict()


def train_members(
    configs: list[TrainConfig],
    make_trainer: Callable[[list[Member], torch.Tensor], Trainer],
    solo: bool,
    splits: DataSplits | None = None,
    device: str | torch.device = "auto",
    out_dirs: list[str | os.PathLike] | None = None,
    callbacks: list[Callable[[EpochReport], None]] | None = None,
    pack_callbacks: list[Callable[[list[EpochReport]], None]] | None = None,
    resume: bool = True,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> list[TrainResult]:
    """The epoch loop of `train` (solo: one config; a non-finite loss raises TrainingDiverged) and of
    raven.pack.train_pack (a diverged member is logged and dropped, the others go on).

    make_trainer(members, train_x) builds the trainer of the members training together; it is
    called again whenever that set changes. The configs share everything that shapes the data
    and the batches (raven.pack.check_packable).
    """
    device = resolve_device(device)
    first = configs[0]
    if device.type == "cpu":
        # A small sigma_aug drives posterior variances to ~1e-4 and below; their products
        # underflow into denormal floats, which x86 CPUs handle ~20x slower.
        torch.set_flush_denormal(True)
    if splits is None:
        splits = load_splits(first.dataset, data_dir, device, first.validation_size, first.limit)
    elif splits.device != device:
        splits = splits.to(device)
    train_x = splits.train_x if first.limit is None else splits.train_x[:first.limit]
    if len(train_x) == 0:
        raise ConfigError("no training images (check --limit)")
    seeds = [c.seed for c in configs]
    labels = ([f"seed {s}" for s in seeds] if len(set(seeds)) == len(seeds)
              else [f"member {i} (seed {s})" for i, s in enumerate(seeds)])
    members = [open_member(i, c, labels[i], out_dirs[i] if out_dirs else None, resume, train_x)
               for i, c in enumerate(configs)]
    for m in members:
        if m.epoch >= m.config.epochs or should_stop(m.config, m.history):
            # Resumed after its end: its checkpoint follows the patience given now.
            note = finish(m)
            if m.out_path:
                save(m, device, len(train_x))
            if note and log:
                log(f"{'' if solo else m.label + ': '}{note}")

    steps_per_epoch = math.ceil(len(train_x) / first.batch_size)
    start_epoch = min(m.epoch for m in members)
    last_epoch = max(c.epochs for c in configs)
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=steps_per_epoch * max(last_epoch - start_epoch, 0), disable=not show_bar, unit="step",
               desc=f"{first.method} {first.dataset}" + ("" if solo else f" pack of {len(configs)}"), leave=False)
    trainer: Trainer | None = None
    packed: list[int] = []
    try:
        for epoch in range(start_epoch, last_epoch):
            if not any(m.running for m in members):
                break
            active = [m for m in members if m.running and m.epoch == epoch]
            if not active:
                bar.update(steps_per_epoch)
                continue
            if [m.index for m in active] != packed:
                # Members that left keep their last state; those at this epoch join.
                for m in members:
                    if not m.running:
                        m.noisy_copy = None  # a training set's worth of memory per member
                trainer = make_trainer(active, train_x)
                packed = [m.index for m in active]
            started = time.perf_counter()
            sums, first_bad = trainer.train_epoch(first.batch_size, on_step=lambda: bar.update(1))
            seconds = time.perf_counter() - started
            reports = []
            for k, m in enumerate(active):
                if first_bad[k] >= 0:
                    m.diverged = divergence_message(epoch, first_bad[k], steps_per_epoch, m.out_path)
                    if solo:
                        raise TrainingDiverged(m.diverged)
                    if log:
                        log(f"{m.label}: training diverged: {m.diverged}")
                    continue
                model_state, m.optimizer_state = trainer.member_state(k)
                # A copy out of a pack; the solo trainer trains m.model itself (copying onto itself is a no-op).
                m.model.load_state_dict(model_state)
                metrics = {f"train_{name}": values[k] / steps_per_epoch for name, values in sums.items()}
                metrics.update(validation_metrics(m.model, m.config, splits.val_x))
                metrics["epoch"] = epoch + 1
                metrics["epoch_seconds"] = seconds
                metrics["images_per_second"] = len(train_x) / seconds
                m.history.append(metrics)
                if m.best_epoch == m.epoch:
                    m.best_state = cpu_copy(m.model.state_dict())
                last = m.epoch >= m.config.epochs or should_stop(m.config, m.history)
                note = finish(m) if last else None
                if m.out_path:
                    save(m, device, len(train_x))
                if log:
                    rate = (f"{metrics['images_per_second']:.0f} img/s" if solo else
                            f"{len(active) * metrics['images_per_second']:.0f} img/s for the pack of {len(active)}")
                    prefix = "" if solo else m.label + ": "
                    log(f"{prefix}epoch {epoch + 1}/{m.config.epochs}  "
                        f"loss {metrics['train_loss']:.2f}  val_elbo {metrics['val_elbo']:.2f}  "
                        f"val_mse_255 {metrics['val_mse_255']:.1f}  {rate}")
                    if note:
                        log(prefix + note)
                report = EpochReport(epoch + 1, metrics, m.config, m.model,
                                     m.out_path / CHECKPOINT_NAME if m.out_path else None,
                                     last=last, best_epoch=m.best_epoch)
                for callback in callbacks or []:
                    callback(report)
                reports.append(report)
            for callback in pack_callbacks or []:
                callback(reports)
    finally:
        bar.close()
    results = []
    for m in members:
        m.model.eval()
        m.model.config = m.config
        m.model.history = m.history
        results.append(TrainResult(m.model, m.config, m.history, m.out_path, diverged=m.diverged,
                                   best_epoch=m.best_epoch))
    return results


def train(
    config: TrainConfig,
    splits: DataSplits | None = None,
    device: str | torch.device = "auto",
    out_dir: str | os.PathLike | None = None,
    callbacks: list[Callable[[EpochReport], None]] | None = None,
    resume: bool = True,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `config` and return the model and per-epoch history.

    With `out_dir`, a checkpoint (model, optimizer, epoch, config, RNG) and metrics.json are
    written after every epoch, and an existing checkpoint there is resumed when `resume`.
    With config.patience, the model returned and checkpointed last is that of the best val_elbo
    epoch (result.best_epoch).
    `progress` None shows a bar only on a terminal; `log` receives one line per epoch.
    A NaN or infinite loss raises TrainingDiverged; the last good checkpoint stays.
    """
    (result,) = train_members([config], lambda members, train_x: SoloTrainer(members[0], train_x), solo=True,
                              splits=splits, device=device, out_dirs=None if out_dir is None else [out_dir],
                              callbacks=callbacks, resume=resume, data_dir=data_dir, progress=progress, log=log)
    return result
