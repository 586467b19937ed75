"""The two VAE baselines: the standard bound (Eq. (2)) and the same bound on clean and noisy images (B)."""

from __future__ import annotations

from raven.data import bernoulli_target
from raven.methods.base import NOISE_STD, PAIR_NOISE_OPTION, Batch, Method, Terms, register
from raven.objectives import vae_loss, vae_noise_loss


@register
class VAE(Method):
    name, label = "vae", "VAE"

    def objective(self, batch: Batch) -> Terms:
        return vae_loss(batch.x, batch.logits, batch.mu, batch.logvar, batch.settings.beta)


@register
class VAENoise(Method):
    """Baseline (B) of Sec. 1 / Appendix C.1, on one fixed noisy copy per seed unless told otherwise."""

    name, label = "vae-noise", "VAE (noise)"
    partner = "noisy"
    options = (NOISE_STD, PAIR_NOISE_OPTION)
    pair_noise_default = "fixed"

    def objective(self, batch: Batch) -> Terms:
        return vae_noise_loss(batch.x, bernoulli_target(batch.partner), batch.logits, batch.logits_pair, batch.mu,
                              batch.logvar, batch.mu_pair, batch.logvar_pair, batch.settings.beta)
