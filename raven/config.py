"""Typed, validated configuration of a training run.

Bad values are rejected here, once, with a message naming the field and the allowed
range, before any data is read or any model is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

METHODS = ("vae", "vae-noise", "raven", "raven-gmm", "se")
DATASETS = ("mnist", "fashion-mnist")

# Appendix C.2: the paper's selected sigma_aug (a standard deviation) and SE coupling eta.
PAPER_SIGMA_AUG = {"mnist": 0.01, "fashion-mnist": 0.04}
PAPER_ETA = {"mnist": 500.0, "fashion-mnist": 5000.0}
PAPER_SE_ETA_GRID = (50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
# The Smooth Encoder's default eta, chosen on validation with sweeps/se_eta.py (README,
# "Smooth Encoder"): the paper's values were tuned for its implementation of SE, and eta's
# scale depends on the likelihood (raven.objectives.smooth_encoder_loss).
DEFAULT_ETA = {"mnist": 10.0, "fashion-mnist": 10.0}

# Methods whose objective sees a (clean, noisy) pair per image.
PAIRED_METHODS = ("vae-noise", "raven", "raven-gmm")
# How a paired method draws its noisy copies: "fixed", one copy of the training set drawn once
# per seed (Appendix C.1's (B), the union of the clean set and one noisy copy); "per-step",
# fresh noise for every batch (a Monte Carlo estimate of Eq. (3)'s expectation over A(x'|x~)).
PAIR_NOISE = ("fixed", "per-step")


class ConfigError(ValueError):
    """A user-supplied setting is out of range; the message is meant to be shown as is."""


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the device is chosen separately).

    sigma_aug is the standard deviation sigma of a(z|z~) = N(z~, sigma^2 I) in
    Definition 1; a tuple gives one sigma per latent dimension (diagonal Sigma_aug).
    None picks the paper's value for the dataset (0.01 MNIST, 0.04 Fashion-MNIST).
    noise_std is the pixel noise of the data pair x' = x + eps, eps ~ N(0, noise_std^2 I): the
    encoder sees x' unclipped, the Bernoulli target is clip(x', 0, 1) (raven.data).
    pair_noise is "fixed" (one noisy copy of the training set per seed) or "per-step" (fresh
    noise per batch); None picks "fixed" for vae-noise, as Appendix C.1 defines (B), and
    "per-step" for raven and raven-gmm, whose Eq. (3) is an expectation over the noise (the
    paper does not say how it drew them). Ignored by the unpaired methods.
    eta is the Smooth Encoder's coupling strength; None picks DEFAULT_ETA for the dataset.
    patience stops training once val_elbo has not improved for that many epochs
    (None trains all `epochs`); the model kept is the last one, at most `patience`
    epochs past the best.
    grad_clip_norm caps the global gradient norm. RAdam takes plain momentum-SGD steps
    for its first few iterations (until its variance estimate is trusted), and with
    sigma_aug = 0.01 the initial KL gradient is ~1e4 times larger than the
    reconstruction's, so those unadapted steps blow the weights up; the cap only binds
    then. None disables it.
    """

    method: str = "raven"
    dataset: str = "mnist"
    sigma_aug: float | tuple[float, ...] | None = None
    noise_std: float = 0.05
    pair_noise: str | None = None
    beta: float = 1.0
    eta: float | None = None
    se_epsilon: float = 0.1
    se_steps: int = 5
    n_components: int = 10
    latent_dim: int = 10
    epochs: int = 20
    patience: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    grad_clip_norm: float | None = 100.0
    seed: int = 0
    limit: int | None = None
    validation_size: int = 5000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        _at_least("latent_dim", self.latent_dim, 1)
        if self.sigma_aug is None:
            object.__setattr__(self, "sigma_aug", PAPER_SIGMA_AUG[self.dataset])
        if isinstance(self.sigma_aug, (list, tuple)):
            sigmas = tuple(float(s) for s in self.sigma_aug)
            if len(sigmas) != self.latent_dim:
                raise ConfigError(
                    f"sigma_aug has {len(sigmas)} values but latent_dim is {self.latent_dim}; "
                    "give one sigma or one per latent dimension"
                )
            for s in sigmas:
                _positive("sigma_aug", s)
            object.__setattr__(self, "sigma_aug", sigmas)
        else:
            _positive("sigma_aug", self.sigma_aug)
            object.__setattr__(self, "sigma_aug", float(self.sigma_aug))
        if self.eta is None:
            object.__setattr__(self, "eta", DEFAULT_ETA[self.dataset])
        _non_negative("eta", self.eta)
        _non_negative("noise_std", self.noise_std)
        if self.pair_noise is None:
            object.__setattr__(self, "pair_noise", "fixed" if self.method == "vae-noise" else "per-step")
        if self.pair_noise not in PAIR_NOISE:
            raise ConfigError(f"pair_noise must be one of {', '.join(PAIR_NOISE)}, got {self.pair_noise!r}")
        _non_negative("beta", self.beta)
        if not (isinstance(self.se_epsilon, (int, float)) and 0 < self.se_epsilon <= 1):
            raise ConfigError(f"se_epsilon must be in (0, 1], got {self.se_epsilon!r}")
        _at_least("se_steps", self.se_steps, 1)
        _at_least("n_components", self.n_components, 1)
        _at_least("epochs", self.epochs, 1)
        if self.patience is not None:
            _at_least("patience", self.patience, 1)
        _at_least("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        if self.grad_clip_norm is not None:
            _positive("grad_clip_norm", self.grad_clip_norm)
        _at_least("seed", self.seed, 0)
        if self.limit is not None:
            _at_least("limit", self.limit, 1)
        _at_least("validation_size", self.validation_size, 1)

    @property
    def paired(self) -> bool:
        return self.method in PAIRED_METHODS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
