"""Closed forms for diagonal Gaussians, shared by the objectives and the attacks.

Every function takes means and log-variances of shape (batch, d) and returns one
value per row, shape (batch,), in nats (or squared latent units for W2).
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL[N(mu, diag e^logvar) || N(0, I)], the regularisation term of Eq. (2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def diag_gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL[N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)]."""
    var_ratio = (logvar_q - logvar_p).exp()
    mahalanobis = (mu_q - mu_p).pow(2) * (-logvar_p).exp()
    return 0.5 * (var_ratio + mahalanobis - 1.0 - (logvar_q - logvar_p)).sum(dim=-1)


def diag_gaussian_w2_squared(
    mu_a: torch.Tensor, logvar_a: torch.Tensor, mu_b: torch.Tensor, logvar_b: torch.Tensor
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians.

    For commuting covariances W2^2 = ||mu_a - mu_b||^2 + ||sigma_a - sigma_b||^2.
    """
    sigma_a = (0.5 * logvar_a).exp()
    sigma_b = (0.5 * logvar_b).exp()
    return (mu_a - mu_b).pow(2).sum(dim=-1) + (sigma_a - sigma_b).pow(2).sum(dim=-1)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag e^logvar), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * (-logvar).exp()).sum(dim=-1)


def diag_gaussian_entropy(logvar: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of N(., diag e^logvar) (Lemma 2)."""
    return 0.5 * (1.0 + LOG_2PI + logvar).sum(dim=-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps drawn from `generator` so that runs replay exactly.

    `eps` passes a standard normal draw shaped like mu instead (a caller that draws its
    randomness up front, such as a pack of models with one generator per member).
    """
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps
