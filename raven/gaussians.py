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


def entropic_coupling_correlation(sigma_a: torch.Tensor, sigma_b: torch.Tensor, gamma: float) -> torch.Tensor:
    """Correlation r* of the optimal coupling of N(., sigma_a^2) and N(., sigma_b^2) in WD_{2,gamma}.

    Among Gaussian couplings with correlation r the objective of `diag_gaussian_entropic_w2` is
    F(r) = (gamma/2) (dmu^2 + sigma_a^2 + sigma_b^2 - 2 r sigma_a sigma_b) - 1/2 log(1 - r^2);
    F'(r) = 0 gives r / (1 - r^2) = k with k = gamma sigma_a sigma_b, so
    r* = 2k / (1 + sqrt(1 + 4k^2)) (the root in (0, 1); written so that k = 0 is exact).
    """
    k = gamma * sigma_a * sigma_b
    return 2.0 * k / (1.0 + torch.sqrt(1.0 + 4.0 * k * k))


def diag_gaussian_entropic_w2(
    mu_a: torch.Tensor, logvar_a: torch.Tensor, mu_b: torch.Tensor, logvar_b: torch.Tensor,
    gamma: float | torch.Tensor,
) -> torch.Tensor:
    """Entropy-regularised 2-Wasserstein divergence WD_{2,gamma} between diagonal Gaussians, in nats.

        WD_{2,gamma}(q_a, q_b) = min over couplings pi of (q_a, q_b) of
                                 (gamma/2) E_pi ||z_a - z_b||^2 + KL(pi || q_a x q_b),

    the coupling term of the Smooth Encoder (Cemgil et al., ICLR 2020, Algorithm 1 and their
    Appendix B.2, derived again here). The KL to the independent coupling is the mutual
    information of pi: this is entropic optimal transport with cost (gamma/2) ||.||^2 and
    regularisation weight 1.

    Closed form. The problem separates over dimensions: q_a has independent coordinates, so
    I(z_a; z_b) = sum_j H(z_aj) - H(z_a | z_b) >= sum_j I(z_aj; z_b) >= sum_j I(z_aj; z_bj), while
    the cost is a sum over j; the product of the per-dimension optima attains this bound. In one
    dimension, among couplings with correlation r the Gaussian one has the largest joint
    entropy, hence the least mutual information, -1/2 log(1 - r^2), at the same cost, so the
    optimum is Gaussian; minimising over r (`entropic_coupling_correlation`) gives, per
    dimension, with k = gamma sigma_a sigma_b and s = sqrt(1 + 4k^2),

        WD_j = (gamma/2) [(mu_a - mu_b)^2 + sigma_a^2 + sigma_b^2] - (s - 1)/2 + 1/2 log((1 + s)/2).

    Limits: gamma -> 0 gives the independent coupling, (gamma/2) E||z_a - z_b||^2; for large k,
    WD_j = (gamma/2) W2_j^2 + 1/2 log(gamma sigma_a sigma_b) + 1/2 + O(1/k), so the Smooth
    Encoder's coupling tends to (gamma/2) W2^2 plus a log term that keeps sigma away from 0.
    (s - 1)/2 is evaluated as 2k^2 / (1 + s), which does not cancel for small k.
    A tensor gamma broadcasts against the result (one value per row), (K, 1) for a pack's members.
    """
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.unsqueeze(-1)  # against the per-dimension terms
    sigma_a = (0.5 * logvar_a).exp()
    sigma_b = (0.5 * logvar_b).exp()
    k = gamma * sigma_a * sigma_b
    s = torch.sqrt(1.0 + 4.0 * k * k)
    independent = 0.5 * gamma * ((mu_a - mu_b).pow(2) + logvar_a.exp() + logvar_b.exp())
    return (independent - 2.0 * k * k / (1.0 + s) + 0.5 * torch.log(0.5 * (1.0 + s))).sum(dim=-1)


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
