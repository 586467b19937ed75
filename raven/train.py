"""The one training loop for every method, its checkpoints, and per-epoch callbacks.

One step: draw the batch (`epoch_order`), its partner (`draw_partner`: the noisy copy,
fixed per seed or fresh per step, or the Smooth Encoder's adversarial x_b), then encode,
sample z, decode and compute the method's objective (`method_terms`), backward, RAdam
step. Each epoch ends with validation metrics, a checkpoint, and the callbacks (Ray Tune
and MLflow plug in here).

All randomness (shuffling, per-step pixel noise, PGD starts, reparameterisation, in that
order within a step) comes from one torch.Generator whose state is checkpointed, so a
resumed run replays exactly the steps an uninterrupted run would have taken; the fixed
noisy copy is drawn from the seed alone and drawn again identically on resume.

The step keeps its random draws apart from its arithmetic: `partner_noise` and
`latent_noise` draw, `make_partner` and `step_terms` compute from the draws. The solo
loop chains them on one generator (draw_partner, method_terms); raven.pack draws each
member's from that member's generator, stacks them, and runs the same make_partner and
step_terms on its K members at once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from raven.config import ConfigError, TrainConfig
from raven.data import DataSplits, fixed_noisy_copy, load_splits, noisy_copy
from raven.gaussians import reparameterize
from raven.methods import METHODS, Batch, Terms
from raven.models import RavenModel
from raven.objectives import bernoulli_nll

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CHECKPOINT_FORMAT = 1
# How often (in steps) the loop looks at the loss for NaN/inf: a look forces a device
# sync, and the offending step is recorded on the device either way.
FINITE_CHECK_EVERY = 50
VALIDATION_BATCH = 1000


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass(frozen=True)
class EpochReport:
    """What a callback receives after each epoch (epoch counts from 1); `last`: no epoch follows
    (config.epochs reached, or patience ran out)."""

    epoch: int
    metrics: dict[str, float]
    config: TrainConfig
    model: RavenModel
    checkpoint_path: Path | None
    last: bool = False


class Callback(Protocol):
    def __call__(self, report: EpochReport) -> None: ...


@dataclass
class TrainResult:
    model: RavenModel
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None
    # Set by raven.pack for a member whose loss became non-finite (train() raises instead):
    # the divergence message; model and history are then those of its last good epoch.
    diverged: str | None = None

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


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


def make_optimizer(params: Any, lr: float, capturable: bool = False) -> torch.optim.RAdam:
    """RAdam (Appendix C.1) over `params`, as every training loop here builds it.

    foreach=True on every device (torch's default only on CUDA): the multi-tensor kernels
    run the same per-element arithmetic in far fewer calls, 3-4x less optimiser time for a
    pack of 25 on CPU; solo and packed runs must use the same implementation to stay equal
    bit for bit.
    """
    return torch.optim.RAdam(params, lr=lr, foreach=True, capturable=capturable)


def build_model(config: TrainConfig) -> RavenModel:
    """The model for `config`, initialised from config.seed (CPU RNG, so identical on any device)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return RavenModel(config.latent_dim, config.n_components if METHODS[config.method].mixture_prior else None)


class StepSettings(Protocol):
    """What a step's arithmetic reads of its configuration: a TrainConfig, or raven.pack's
    PackSettings, whose values that differ between members are tensors broadcasting over
    the pack ((K, 1) per pair, (K, 1, d) for sigma_aug)."""

    method: str
    beta: float | torch.Tensor
    noise_std: float


def epoch_order(n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """The epoch's batch order: a permutation of the n training rows drawn from `generator`."""
    return torch.randperm(n, generator=generator, device=device)


def training_noisy_copy(config: TrainConfig, train_x: torch.Tensor) -> torch.Tensor | None:
    """The one noisy copy of the training set (pair_noise "fixed", paired methods), else None.

    Drawn from config.seed alone (raven.data.fixed_noisy_copy), not from the training
    generator, so it is the same on resume and whatever the batch order.
    """
    if not (METHODS[config.method].paired and config.pair_noise == "fixed"):
        return None
    return fixed_noisy_copy(train_x, config.noise_std, config.seed)


def partner_noise(config: TrainConfig, batch_size: int, generator: torch.Generator,
                  fixed_partner: bool = False) -> dict[str, torch.Tensor]:
    """The random numbers of a batch's partner, the first a step draws: "start", an adversarial
    partner's U(0, 1) start, or "pixel", the N(0, 1) of a fresh noisy copy, each (batch, 784);
    nothing for an unpaired method or when the batch's rows of a fixed copy are given."""
    return METHODS[config.method].partner_noise(batch_size, generator, fixed_partner)


def latent_noise(config: TrainConfig, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The N(0, 1) of the step's reparameterisation, drawn after the partner's: (rows, d), with
    rows = 2 * batch for the paired methods (clean rows, then partner rows), batch otherwise
    (the Smooth Encoder samples z for x_a alone)."""
    rows = 2 * batch_size if METHODS[config.method].paired else batch_size
    return torch.randn((rows, config.latent_dim), generator=generator, device=generator.device)


def make_partner(model: RavenModel, config: StepSettings, x: torch.Tensor, noise: dict[str, torch.Tensor],
                 fixed_partner: torch.Tensor | None = None) -> torch.Tensor | None:
    """The batch's partner images from its draws (`partner_noise`): None for an unpaired method,
    the method's crafted partner (the Smooth Encoder's x_b), else the noisy copy x + eps
    (`fixed_partner`, the batch's rows of `training_noisy_copy`, when given). The noisy copy is
    unclipped (raven.data.noisy_copy)."""
    method = METHODS[config.method]
    if method.partner == "none":
        return None
    if method.partner == "adversarial":
        return method.craft_partner(model, x, config, noise["start"])
    return fixed_partner if fixed_partner is not None else noisy_copy(x, config.noise_std, eps=noise["pixel"])


def step_terms(model: RavenModel, config: StepSettings, x: torch.Tensor, partner: torch.Tensor | None,
               eps: torch.Tensor, n_data: int | None = None) -> Terms:
    """The method's objective on clean images x and their partners, z sampled with `eps` (`latent_noise`).

    Encode (the pair in one pass), sample, decode (the partner too where the method is paired),
    then the method's terms from one `raven.methods.Batch`. Written over the last two
    dimensions, so raven.pack passes (K, batch, 784) images and partners, its K-member model and
    stacked draws, and gets one value per member in every term. n_data: the images the batch
    was drawn from (default: the batch itself).
    """
    method = METHODS[config.method]
    mu_pair = logvar_pair = z_pair = logits_pair = None
    if partner is None:
        mu, logvar = model.encoder(x)
        z = reparameterize(mu, logvar, eps=eps)
        logits = model.decoder(z)
    else:
        # One pass over the stacked pair: twice the rows per matrix product, half the kernel launches.
        mu_both, logvar_both = model.encoder(torch.cat([x, partner], dim=-2))
        mu, mu_pair = mu_both.chunk(2, dim=-2)
        logvar, logvar_pair = logvar_both.chunk(2, dim=-2)
        if method.paired:
            z_both = reparameterize(mu_both, logvar_both, eps=eps)
            logits, logits_pair = model.decoder(z_both).chunk(2, dim=-2)
            z, z_pair = z_both.chunk(2, dim=-2)
        else:
            z = reparameterize(mu, logvar, eps=eps)
            logits = model.decoder(z)
    batch = Batch(x=x, partner=partner, mu=mu, logvar=logvar, mu_pair=mu_pair, logvar_pair=logvar_pair, z=z,
                  z_pair=z_pair, logits=logits, logits_pair=logits_pair,
                  prior=model.prior if method.mixture_prior else None, settings=config,
                  n_data=x.shape[-2] if n_data is None else n_data)
    return method.objective(batch)


def draw_partner(model: RavenModel, config: TrainConfig, x: torch.Tensor, generator: torch.Generator,
                 fixed_partner: torch.Tensor | None = None) -> torch.Tensor | None:
    """The batch's partner images, their noise drawn from `generator` (see `make_partner`)."""
    noise = partner_noise(config, len(x), generator, fixed_partner is not None)
    return make_partner(model, config, x, noise, fixed_partner)


def method_terms(model: RavenModel, config: TrainConfig, x: torch.Tensor, partner: torch.Tensor | None,
                 generator: torch.Generator, n_data: int | None = None) -> Terms:
    """The method's objective on clean images x and their partners; draws only the z samples."""
    return step_terms(model, config, x, partner, latent_noise(config, len(x), generator), n_data)


def method_loss(model: RavenModel, config: TrainConfig, x: torch.Tensor, generator: torch.Generator,
                fixed_partner: torch.Tensor | None = None, n_data: int | None = None) -> Terms:
    """The method's objective on a batch of clean images, partners and z drawn from `generator`."""
    return method_terms(model, config, x, draw_partner(model, config, x, generator, fixed_partner), generator,
                        n_data)


def train_step(model: RavenModel, optimizer: torch.optim.Optimizer, config: TrainConfig, x: torch.Tensor,
               generator: torch.Generator, fixed_partner: torch.Tensor | None = None,
               n_data: int | None = None) -> Terms:
    """One optimiser step of the solo loop on batch x: objective, backward, norm cap, RAdam."""
    terms = method_loss(model, config, x, generator, fixed_partner, n_data)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if config.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    optimizer.step()
    return terms


def single_image_kl(model: RavenModel, config: TrainConfig, mu: torch.Tensor, logvar: torch.Tensor,
                    z: torch.Tensor) -> torch.Tensor:
    """KL[q(z|x) || p(z)] against the model's marginal prior of one latent (the method's `marginal_kl`).

    This makes val_elbo a bound on log p(x) for every method, comparable across methods.
    """
    return METHODS[config.method].marginal_kl(model, config, mu, logvar, z)


def validation_metrics(model: RavenModel, config: TrainConfig, val_x: torch.Tensor) -> dict[str, float]:
    """val_loss (the method's objective), val_elbo (nats per image), val_mse_255 (pixel MSE on 0-255).

    A generator reseeded identically every call gives every epoch the same noise, so the
    numbers move only because the model does.
    """
    generator = torch.Generator(device=val_x.device).manual_seed(config.seed + 1_000_003)
    sums = {"val_loss": 0.0, "val_elbo": 0.0, "val_mse_255": 0.0}
    was_training = model.training
    model.eval()
    for start in range(0, len(val_x), VALIDATION_BATCH):
        x = val_x[start:start + VALIDATION_BATCH]
        # A crafted partner is an attack on the encoder: it needs gradients even here.
        with torch.enable_grad() if METHODS[config.method].partner == "adversarial" else torch.no_grad():
            loss = method_loss(model, config, x, generator, n_data=len(val_x))["loss"].detach()
        with torch.no_grad():
            mu, logvar = model.encoder(x)
            z = reparameterize(mu, logvar, generator)
            elbo = -bernoulli_nll(model.decoder(z), x) - single_image_kl(model, config, mu, logvar, z)
            mse = (torch.sigmoid(model.decoder(mu)) - x).pow(2).mean(dim=-1) * 255.0**2
        sums["val_loss"] += float(loss) * len(x)
        sums["val_elbo"] += float(elbo.sum())
        sums["val_mse_255"] += float(mse.sum())
    model.train(was_training)
    return {name: total / len(val_x) for name, total in sums.items()}


def epochs_since_best(history: list[dict[str, float]]) -> int:
    """Epochs since val_elbo last improved (0 when the latest epoch is the best)."""
    values = [h["val_elbo"] for h in history]
    return len(values) - 1 - max(range(len(values)), key=values.__getitem__) if values else 0


def should_stop(config: TrainConfig, history: list[dict[str, float]]) -> bool:
    return config.patience is not None and epochs_since_best(history) >= config.patience


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A checkpoint folder or file -> the checkpoint file, with a clear error when absent."""
    path = Path(path)
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no raven checkpoint at {path} (expected {CHECKPOINT_NAME} written by `raven train`)")
    return file


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{file} is not a readable raven checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{file}: not a raven checkpoint of format {CHECKPOINT_FORMAT} (found {found!r})")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RavenModel:
    """The trained model from a checkpoint folder or file, in eval mode.

    The model carries `.config` (TrainConfig) and `.history` (per-epoch metrics).
    """
    state = load_state(path, map_location)
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.to(map_location).eval()
    model.config = config
    model.history = state["history"]
    return model


def resume_state(checkpoint_path: Path, config: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint to resume `config` from, None when there is none; epochs and patience may change."""
    if not checkpoint_path.is_file():
        return None
    state = load_state(checkpoint_path, device)
    saved = TrainConfig.from_dict(state["config"])
    if saved.replace(epochs=config.epochs, patience=config.patience) != config:
        raise ConfigError(f"{checkpoint_path} was trained with a different config; "
                          "use another --out, or --fresh to start over")
    return state


def write_checkpoint(out_path: Path, config: TrainConfig, model_state: dict[str, torch.Tensor],
                     optimizer_state: dict[str, Any], generator: torch.Generator, history: list[dict[str, float]],
                     device: torch.device, train_images: int) -> None:
    """DIR/checkpoint.pt (everything resume needs) and DIR/metrics.json after epoch len(history)."""
    _atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": model_state,
        "optimizer": optimizer_state,
        "generator": generator.get_state(),
        "epoch": len(history),
        "history": history,
        "torch_version": torch.__version__,
    }, out_path / CHECKPOINT_NAME)
    _write_json({"config": config.to_dict(), "device": str(device), "train_images": train_images,
                 "history": history, "final": history[-1]}, out_path / METRICS_NAME)


def divergence_message(epoch: int, bad_step: int, steps_per_epoch: int, out_path: Path | None) -> str:
    """What TrainingDiverged says: epoch (from 0) and step (from 0) of the first non-finite loss."""
    return (f"loss became NaN or infinite at epoch {epoch + 1}, step {bad_step + 1} of {steps_per_epoch} "
            f"(global step {epoch * steps_per_epoch + bad_step + 1})"
            f"{'; the last good checkpoint is kept in ' + str(out_path) if out_path else ''}"
            "; try a lower --lr or --beta")


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
    `progress` None shows a bar only on a terminal; `log` receives one line per epoch.
    """
    device = resolve_device(device)
    if device.type == "cpu":
        # A small sigma_aug drives posterior variances to ~1e-4 and below; their products
        # underflow into denormal floats, which x86 CPUs handle ~20x slower.
        torch.set_flush_denormal(True)
    if splits is None:
        splits = load_splits(config.dataset, data_dir, device, config.validation_size, config.limit)
    elif splits.device != device:
        splits = splits.to(device)
    train_x = splits.train_x if config.limit is None else splits.train_x[:config.limit]
    if len(train_x) == 0:
        raise ConfigError("no training images (check --limit)")

    fixed_pairs = training_noisy_copy(config, train_x)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model.parameters(), config.lr)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0
    out_path = Path(out_dir) if out_dir is not None else None
    checkpoint_path = out_path / CHECKPOINT_NAME if out_path else None
    if out_path:
        out_path.mkdir(parents=True, exist_ok=True)
        state = resume_state(checkpoint_path, config, device) if resume else None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"].cpu())
            history = state["history"]
            start_epoch = state["epoch"]

    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=steps_per_epoch * (config.epochs - start_epoch), disable=not show_bar, unit="step",
               desc=f"{config.method} {config.dataset}", leave=False)
    model.train()
    try:
        for epoch in range(start_epoch, config.epochs):
            if should_stop(config, history):
                if log:
                    log(f"early stop after epoch {epoch}: val_elbo has not improved for {config.patience} epochs")
                break
            started = time.perf_counter()
            order = epoch_order(len(train_x), generator, device)
            totals: dict[str, torch.Tensor] = {}
            first_bad_step = torch.tensor(-1, device=device)
            for step in range(steps_per_epoch):
                index = order[step * config.batch_size:(step + 1) * config.batch_size]
                x = train_x[index]
                terms = train_step(model, optimizer, config, x, generator,
                                   None if fixed_pairs is None else fixed_pairs[index], len(train_x))
                loss = terms["loss"]
                with torch.no_grad():
                    for name, value in terms.items():
                        totals[name] = totals.get(name, 0.0) + value.detach()
                    bad_now = (~torch.isfinite(loss)) & (first_bad_step < 0)
                    first_bad_step = torch.where(bad_now, step, first_bad_step)
                if (step + 1) % FINITE_CHECK_EVERY == 0 or step + 1 == steps_per_epoch:
                    if int(first_bad_step) >= 0:
                        raise TrainingDiverged(divergence_message(epoch, int(first_bad_step), steps_per_epoch,
                                                                  out_path))
                bar.update(1)
            seconds = time.perf_counter() - started
            metrics = {f"train_{name}": float(total) / steps_per_epoch for name, total in totals.items()}
            metrics.update(validation_metrics(model, config, splits.val_x))
            metrics["epoch"] = epoch + 1
            metrics["epoch_seconds"] = seconds
            metrics["images_per_second"] = len(train_x) / seconds
            history.append(metrics)
            if out_path:
                write_checkpoint(out_path, config, model.state_dict(), optimizer.state_dict(), generator, history,
                                 device, len(train_x))
            if log:
                log(f"epoch {epoch + 1}/{config.epochs}  loss {metrics['train_loss']:.2f}  "
                    f"val_elbo {metrics['val_elbo']:.2f}  val_mse_255 {metrics['val_mse_255']:.1f}  "
                    f"{metrics['images_per_second']:.0f} img/s")
            report = EpochReport(epoch + 1, metrics, config, model, checkpoint_path,
                                 last=epoch + 1 == config.epochs or should_stop(config, history))
            for callback in callbacks or []:
                callback(report)
    finally:
        bar.close()
    model.eval()
    model.config = config
    model.history = history
    return TrainResult(model, config, history, out_path)
