r"""β-TCVAE (Chen et al., NeurIPS 2018, "Isolating sources of disentanglement in VAEs").

Chen et al.'s Eq. (2) splits the VAE's KL term, averaged over the N training images n:

    E_p(n) KL[q(z|n) || p(z)] = I_q(z; n) + KL[q(z) || prod_j q(z_j)] + sum_j KL[q(z_j) || p(z_j)],

the index-code mutual information, the total correlation (TC) of the aggregate posterior
q(z) = (1/N) sum_n q(z|n), and the dimension-wise KL. Their Eq. (4) weighs the three alpha,
beta, gamma; with alpha = gamma = 1 (their setting, and Willetts et al.'s, ICLR 2021, who found
that penalising TC makes VAEs more robust to attacks on the encoder) it is the negative VAE bound
plus (beta - 1) TC. Here beta is `tc_beta`, and raven's global `beta` still weighs the whole KL part:

    loss = -E_q log p(x|z) + beta * (KL[q(z|x) || N(0, I)] + (tc_beta - 1) TC).

TC has no closed form; it is estimated on each minibatch by minibatch-weighted sampling (MWS,
Chen et al. Sec. 4.1 and Appendix C.1). For the samples z_i ~ q(z|n_i) of a batch of M images
drawn from N,

    log q(z_i)    ~ log sum_j q(z_i | n_j)    - log(N M),
    log q(z_ij)   ~ log sum_k q(z_ij | n_k)   - log(N M)   (each dimension j),
    TC            ~ mean_i [log q(z_i) - sum_j log q(z_ij)].

Choice (deviation D15 in docs/methods.md): this is the estimator as Chen et al. define it and
as their code computes it, not a corrected one. It is biased: with the whole data set as the
batch (M = N) each log-density is log q - log N exactly, so TC comes out (d - 1) log N above
the true TC (tests/test_beta_tcvae.py checks this identity against exact mixture densities).
A constant offset changes no gradient; the reported `tc` term carries it.
"""

from __future__ import annotations

import math

import torch

from raven.gaussians import LOG_2PI, standard_normal_kl
from raven.methods.base import Batch, Method, Terms, register
from raven.objectives import bernoulli_nll
from raven.options import Option, non_negative

TC_BETA = Option("tc_beta", 5.0, "beta of beta-TCVAE: the weight of the total correlation (Chen et al. Eq. (4); "
                 "1 is the VAE; not tuned here: sweep it on validation)",
                 lambda v, values, method: non_negative("tc_beta", v), per_member=True)


def log_density_matrix(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_i,d; mu_j,d, exp(logvar_j,d)) for every sample i and posterior j: (..., M, M, d) from (..., M, d)."""
    diff = z.unsqueeze(-2) - mu.unsqueeze(-3)
    return -0.5 * (LOG_2PI + logvar.unsqueeze(-3) + diff.pow(2) / logvar.exp().unsqueeze(-3))


def total_correlation_mws(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, n_data: int) -> torch.Tensor:
    """Per sample i, the MWS estimate log q(z_i) - sum_d log q(z_i,d) (Chen et al. Appendix C.1): (..., M)."""
    log_q_ij = log_density_matrix(z, mu, logvar)
    log_weight = math.log(n_data * z.shape[-2])
    log_qz = torch.logsumexp(log_q_ij.sum(dim=-1), dim=-1) - log_weight
    log_qz_dims = (torch.logsumexp(log_q_ij, dim=-2) - log_weight).sum(dim=-1)
    return log_qz - log_qz_dims


def beta_tcvae_loss(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
                    n_data: int, tc_beta: float | torch.Tensor, beta: float | torch.Tensor = 1.0) -> Terms:
    """Negative beta-TCVAE objective, Chen et al. Eq. (4) with alpha = gamma = 1, TC by MWS."""
    recon = bernoulli_nll(logits, x)
    kl = standard_normal_kl(mu, logvar)
    tc = total_correlation_mws(z, mu, logvar, n_data)
    return {"loss": (recon + beta * (kl + (tc_beta - 1.0) * tc)).mean(dim=-1), "recon": recon.mean(dim=-1),
            "kl": kl.mean(dim=-1), "tc": tc.mean(dim=-1)}


@register
class BetaTCVAE(Method):
    name, label = "beta-tcvae", "β-TCVAE"
    options = (TC_BETA,)

    def objective(self, batch: Batch) -> Terms:
        return beta_tcvae_loss(batch.x, batch.logits, batch.mu, batch.logvar, batch.z, batch.n_data,
                               batch.settings.tc_beta, batch.settings.beta)
