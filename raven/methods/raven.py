"""RAVEN (Theorem 1) and RAVEN with a trainable mixture prior (Theorem 2, Appendix B)."""

from __future__ import annotations

import torch

from raven.data import bernoulli_target
from raven.gaussians import diag_gaussian_kl, diag_gaussian_log_prob
from raven.methods.base import NOISE_STD, PAIR_NOISE_OPTION, Batch, Method, Terms, register
from raven.objectives import aug_variance, mixture_component_log_prob, raven_gmm_loss, raven_loss
from raven.options import ConfigError, Option, at_least, positive

# Appendix C.2: the paper's selected sigma_aug (a standard deviation), per dataset.
PAPER_SIGMA_AUG = {"mnist": 0.01, "fashion-mnist": 0.04}


def _sigma_aug(value, values, method) -> float | tuple[float, ...]:
    if value is None:
        return PAPER_SIGMA_AUG[values["dataset"]]
    if isinstance(value, (list, tuple)):
        sigmas = tuple(float(positive("sigma_aug", s)) for s in value)
        if len(sigmas) != values["latent_dim"]:
            raise ConfigError(f"sigma_aug has {len(sigmas)} values but latent_dim is {values['latent_dim']}; "
                              "give one sigma or one per latent dimension")
        return sigmas
    return float(positive("sigma_aug", value))


def _sigma_list(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"sigma_aug expects a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


SIGMA_AUG = Option(
    "sigma_aug", None, "std of a(z|z~) (Definition 1): one number or one per latent dimension (default: the "
    "paper's, " + " / ".join(f"{v:g} {k}" for k, v in PAPER_SIGMA_AUG.items()) + ")", _sigma_aug,
    per_member=True, row=lambda s, d: list(s) if isinstance(s, tuple) else [s] * d, parse=_sigma_list)
N_COMPONENTS = Option("n_components", 10, "mixture components of raven-gmm's prior",
                      lambda v, values, method: at_least("n_components", v, 1))


@register
class Raven(Method):
    """Negative RAVEN bound, Theorem 1, Eq. (8) with the KL of Eq. (7) (raven.objectives.raven_kl)."""

    name, label = "raven", "RAVEN"
    partner = "noisy"
    options = (SIGMA_AUG, NOISE_STD, PAIR_NOISE_OPTION)

    def objective(self, batch: Batch) -> Terms:
        return raven_loss(batch.x, bernoulli_target(batch.partner), batch.logits, batch.logits_pair, batch.mu,
                          batch.logvar, batch.mu_pair, batch.logvar_pair, batch.settings.sigma_aug,
                          batch.settings.beta)

    def marginal_kl(self, model, settings, mu, logvar, z):
        """Integrating z' out of Definition 1 leaves p(z) = N(0, I + Sigma_aug)."""
        var = 1.0 + aug_variance(settings.sigma_aug, mu)
        return diag_gaussian_kl(mu, logvar, torch.zeros_like(mu), var.log().expand_as(mu))


@register
class RavenGMM(Method):
    """Negative RAVEN bound with the trainable mixture prior, Theorem 2 / Eq. (15)."""

    name, label = "raven-gmm", "RAVEN-GMM"
    partner = "noisy"
    mixture_prior = True
    options = (SIGMA_AUG, NOISE_STD, PAIR_NOISE_OPTION, N_COMPONENTS)

    def objective(self, batch: Batch) -> Terms:
        prior = batch.prior
        return raven_gmm_loss(batch.x, bernoulli_target(batch.partner), batch.logits, batch.logits_pair, batch.mu,
                              batch.logvar, batch.mu_pair, batch.logvar_pair, batch.z, batch.z_pair, prior.logits,
                              prior.means, prior.logvars, batch.settings.sigma_aug, batch.settings.beta)

    def marginal_kl(self, model, settings, mu, logvar, z):
        """sum_c pi_c N(mu_c, Sigma_c + Sigma_aug) after integrating z' out: a one-sample estimate, no closed form."""
        prior = model.prior
        log_p = torch.logsumexp(mixture_component_log_prob(
            z, prior.logits, prior.means, prior.logvars, aug_variance(settings.sigma_aug, mu)), dim=-1)
        return diag_gaussian_log_prob(z, mu, logvar) - log_p
