"""What a method is: one object that says how its partner is made and computes its named terms.

A step (raven.step.step_terms) encodes the batch and its partner, samples z and decodes, and
hands the method one `Batch`; the method returns its terms as pure functions of those tensors
(raven.objectives, with the paper's equation numbers). Training, packs, validation, the
evaluation, the sweeps, the CLI and the report find methods by name in raven.methods.METHODS,
never by comparing strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raven.data import IMAGE_SIZE
from raven.gaussians import standard_normal_kl
from raven.options import ConfigError, Option, non_negative

Terms = dict[str, torch.Tensor]
PAIR_NOISE = ("fixed", "per-step")


@dataclass(frozen=True)
class Batch:
    """One step's tensors, each with an optional leading pack dimension (K, batch, ...).

    x: the clean images, also their Bernoulli target; partner: the partner images as the encoder
    saw them (None for unpaired methods); mu/logvar: q(z|x); z, logits: the sample and its decoder
    logits. The *_pair fields are the partner's (None where the method does not use them); z_pair
    and logits_pair exist only for methods that decode the partner. prior: the model's trainable
    prior module (None without one). settings: the step's settings (TrainConfig, or a pack's with
    per-member tensors). n_data: the number of images the batch was drawn from.
    """

    x: torch.Tensor
    partner: torch.Tensor | None
    mu: torch.Tensor
    logvar: torch.Tensor
    mu_pair: torch.Tensor | None
    logvar_pair: torch.Tensor | None
    z: torch.Tensor
    z_pair: torch.Tensor | None
    logits: torch.Tensor
    logits_pair: torch.Tensor | None
    prior: Any
    settings: Any
    n_data: int


def _noise_std(value: Any, values: dict[str, Any], method: "Method") -> float:
    return non_negative("noise_std", value)


def _pair_noise(value: Any, values: dict[str, Any], method: "Method") -> str:
    value = method.pair_noise_default if value is None else value
    if value not in PAIR_NOISE:
        raise ConfigError(f"pair_noise must be one of {', '.join(PAIR_NOISE)}, got {value!r}")
    return value


# The pixel noise of the data pair x' = x + eps, shared by the methods trained on noisy pairs.
NOISE_STD = Option("noise_std", 0.05, "pixel noise of the training pair, eps ~ N(0, noise_std^2 I)", _noise_std)
PAIR_NOISE_OPTION = Option(
    "pair_noise", None, "noisy copies: one fixed copy of the training set per seed, or fresh noise per step "
    "(default: fixed for vae-noise, as Appendix C.1; per-step for raven and raven-gmm, whose Eq. (3) is an "
    "expectation over the noise)", _pair_noise, choices=PAIR_NOISE, parse=str)


class Method:
    """One method. Subclasses set the class attributes and write `objective`.

    name: the registry key and --method value; label: its name in tables and figures.
    partner: "none", "noisy" (the pixel-noise pair x' = x + eps, encoded and decoded with x)
    or "adversarial" (a partner crafted by `craft_partner` from a uniform start, encoded only).
    mixture_prior: the model carries a trainable mixture prior (raven.models).
    options: the TrainConfig fields the method reads beyond the shared ones.
    pair_noise_default: how a noisy-pair method draws its copies unless told.
    """

    name: str = ""
    label: str = ""
    partner: str = "none"
    mixture_prior: bool = False
    options: tuple[Option, ...] = ()
    pair_noise_default: str = "per-step"

    @property
    def paired(self) -> bool:
        """Trained on (clean, noisy) pairs: both encoded, sampled and decoded."""
        return self.partner == "noisy"

    def partner_noise(self, batch_size: int, generator: torch.Generator,
                      fixed_partner: bool) -> dict[str, torch.Tensor]:
        """The random numbers of a batch's partner, the first a step draws (see raven.step.partner_noise)."""
        device = generator.device
        if self.partner == "adversarial":
            return {"start": torch.rand((batch_size, IMAGE_SIZE), generator=generator, device=device)}
        if self.partner == "noisy" and not fixed_partner:
            return {"pixel": torch.randn((batch_size, IMAGE_SIZE), generator=generator, device=device)}
        return {}

    def craft_partner(self, model: Any, x: torch.Tensor, settings: Any, start_noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} crafts no adversarial partner")

    def objective(self, batch: Batch) -> Terms:
        """The method's loss ("loss", minimised) and its named terms, batch means (one per pack member)."""
        raise NotImplementedError

    def marginal_kl(self, model: Any, settings: Any, mu: torch.Tensor, logvar: torch.Tensor,
                    z: torch.Tensor) -> torch.Tensor:
        """KL[q(z|x) || p(z)] against the model's marginal prior of one latent, per image (val_elbo).

        The VAEs' prior is N(0, I); a method with another prior says so here.
        """
        return standard_normal_kl(mu, logvar)

    def __repr__(self) -> str:
        return f"<method {self.name}>"


# Filled by @register as raven.methods imports each method's module, in that order.
REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: put one instance of the method in the registry under its name."""
    if not cls.name or cls.name in REGISTRY:
        raise RuntimeError(f"method {cls.__name__} needs a unique name, got {cls.name!r}")
    REGISTRY[cls.name] = cls()
    return cls
