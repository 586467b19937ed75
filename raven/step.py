"""One training step for every method, the solo loop's and the pack's, and the validation metrics.

One step: draw the batch's partner (the noisy copy, fixed per seed or fresh per step, or the
Smooth Encoder's adversarial x_b), then encode, sample z, decode and compute the method's
objective (`raven.methods`), backward, norm cap, RAdam step (`train_step`).

The step keeps its random draws apart from its arithmetic: `partner_noise` and
`latent_noise` draw, `make_partner` and `step_terms` compute from the draws. The solo step
chains them on one generator (`draw_partner`, `method_terms`); raven.pack draws each
member's from that member's generator, stacks them, and runs the same make_partner and
step_terms on its K members at once. Within a step the draws come in one order (partner
noise or PGD start, then reparameterisation), after the epoch's batch order (`epoch_order`),
so a run's randomness is its generator's state, which the checkpoint keeps.

Precision: with config.precision "bf16", `train_step` and the pack's step run under
`matmul_precision`, an autocast to bfloat16; `step_terms` takes the encoder's and decoder's
outputs back to float32 and computes the objective with autocast off, so only the network's
matrix products are bf16. The weights, their gradients and RAdam stay float32.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Protocol

import torch

from raven.config import TrainConfig
from raven.data import fixed_noisy_copy, noisy_copy
from raven.gaussians import reparameterize
from raven.methods import METHODS, Batch, Terms
from raven.models import RavenModel
from raven.objectives import bernoulli_nll

VALIDATION_BATCH = 1000


# bf16 pays only where the hardware multiplies it: a bf16-capable GPU, or a CPU whose oneDNN runs bf16 natively
# (AVX-512 BF16, AMX). Elsewhere torch emulates it: on an AMD EPYC with AVX2, a 1000x784 @ 784x500 product took
# 45 ms in bf16 against 5.6 ms in fp32 (docs/benchmarks.md), so a bf16 run there is warned, once per device type.
def bf16_is_native(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 in hardware (CUDA: torch's own test; CPU: oneDNN's)."""
    return _native(torch.device(device).type)


@functools.cache
def _native(device_type: str) -> bool:  # asked at every step of a bf16 run: answered once
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other backends: no test; trust the request


@functools.cache
def _warn_once(device_type: str) -> None:
    capability = torch.backends.cpu.get_cpu_capability() if device_type == "cpu" else device_type
    warnings.warn(f"precision bf16 on a {device_type} without native bfloat16 ({capability}): torch emulates it, "
                  "several times slower than fp32 here; use --precision fp32", RuntimeWarning, stacklevel=3)


def warn_if_bf16_is_slow(precision: str, device: torch.device | str) -> None:
    """One RuntimeWarning per device type when `precision` is "bf16" and `device` has no native bfloat16."""
    if precision == "bf16" and not bf16_is_native(device):
        _warn_once(torch.device(device).type)


def matmul_precision(precision: str, device: torch.device | str, cache: bool = True) -> torch.autocast:
    """The step's matrix products in `precision`: an autocast to bfloat16 for "bf16", off for "fp32".

    cache=False re-casts the weights at every use, as a CUDA graph capture requires. bf16 on a device
    without native bfloat16 is warned once (warn_if_bf16_is_slow)."""
    warn_if_bf16_is_slow(precision, device)
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16",
                          cache_enabled=cache)


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

    # Under matmul_precision("bf16") the networks' outputs are bfloat16: everything after them is float32.
    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = model.encoder(images)
        return mu.float(), logvar.float()

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decoder(z).float()

    if partner is None:
        mu, logvar = encode(x)
        z = reparameterize(mu, logvar, eps=eps)
        logits = decode(z)
    else:
        # One pass over the stacked pair: twice the rows per matrix product, half the kernel launches.
        mu_both, logvar_both = encode(torch.cat([x, partner], dim=-2))
        mu, mu_pair = mu_both.chunk(2, dim=-2)
        logvar, logvar_pair = logvar_both.chunk(2, dim=-2)
        if method.paired:
            z_both = reparameterize(mu_both, logvar_both, eps=eps)
            logits, logits_pair = decode(z_both).chunk(2, dim=-2)
            z, z_pair = z_both.chunk(2, dim=-2)
        else:
            z = reparameterize(mu, logvar, eps=eps)
            logits = decode(z)
    batch = Batch(x=x, partner=partner, mu=mu, logvar=logvar, mu_pair=mu_pair, logvar_pair=logvar_pair, z=z,
                  z_pair=z_pair, logits=logits, logits_pair=logits_pair,
                  prior=model.prior if method.mixture_prior else None, settings=config,
                  n_data=x.shape[-2] if n_data is None else n_data)
    with torch.autocast(x.device.type, enabled=False):
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
    """One optimiser step of the solo loop on batch x: objective (its products in config.precision), backward,
    norm cap, RAdam."""
    with matmul_precision(config.precision, x.device):
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
